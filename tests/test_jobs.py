"""Job files: `indexer run` is `indexer build` with the settings written down; shipped examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from indexer.cli import build, job_argv, main
from indexer.config import read_job
from indexer.lock import CollectionLock
from tests.helpers import BUILD_FLAGS, read_embeddings_by_key, run_cli

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def parses(argv: list[str]) -> dict:
    """The build parameters click makes of argv (raises on a bad value)."""
    with build.make_context("build", argv, parent=click.Context(main)) as ctx:
        return dict(ctx.params)


def test_a_job_equals_the_same_build_flags(corpus: Path, tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    (job_dir / "pics.toml").write_text(
        f'sources = ["{corpus / "group2"}"]\nout = "../out/pics.idx"\n'
        "pretrained = false\nworkers = 0\nbatch-size = 4\nprogress = false\n"
        'index_type = "hnsw"\nmax_index_memory = "1G"\ntarget_recall = 0.9\n'
    )
    result = run_cli("run", job_dir / "pics.toml")
    assert result.exit_code == 0, result.output
    from_job = tmp_path / "out" / "pics.idx"  # relative to the job file, not the cwd
    meta = json.loads((from_job / "index" / "meta.json").read_text())
    assert (meta["type"], meta["max_memory"], meta["target_recall"]) == ("hnsw", 1024**3, 0.9)
    flags = run_cli("build", corpus / "group2", "--out", tmp_path / "flags", *BUILD_FLAGS)
    assert flags.exit_code == 0
    a, b = read_embeddings_by_key(from_job), read_embeddings_by_key(tmp_path / "flags")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('sources = ["x"]\nout = "o"\nbogus = 1\n', "unknown setting(s) ['bogus']"),
        ('sources = ["x"]\nout = "o"\nworkers = "many"\n', "Invalid value for '--workers'"),
        ('out = "o"\n', "Missing argument 'SOURCES...'"),
        ('sources = ["x"]\nout = "o"\npretrained = "yes"\n', "must be true or false"),
        ("sources = [\n", "not valid TOML"),
    ],
)
def test_bad_job_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    result = run_cli("run", job)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and message in result.output
    assert result.output.count("\n") == 1


def test_shipped_example_and_configmap_are_valid_jobs(tmp_path: Path) -> None:
    params = parses(job_argv(read_job(JOBS / "example.toml"), JOBS / "example.toml"))
    assert params["sources"] == ("/data/photos",) and params["out"] == Path("/data/photos.idx")
    assert params["rebuild"] is False and params["max_failures"] == 0.05
    docs = list(yaml.safe_load_all((JOBS / "kubernetes" / "cronjob.yaml").read_text()))
    config_map, cron_job = docs
    assert cron_job["spec"]["concurrencyPolicy"] == "Forbid"
    rules = cron_job["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [75]
    job = tmp_path / "photos.toml"
    job.write_text(config_map["data"]["photos.toml"])
    assert read_job(job)["out"] == "/data/photos.idx"
    assert parses(job_argv(read_job(job), job))["sources"] == ("/data/photos",)
    service = (JOBS / "systemd" / "indexer-photos.service").read_text()
    assert "SuccessExitStatus=5 75" in service and "Type=oneshot" in service
    assert "OnCalendar=" in (JOBS / "systemd" / "indexer-photos.timer").read_text()


def test_cron_wrapper_skips_quietly_when_locked(corpus: Path, tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'sources = ["{corpus / "group3"}"]\nout = "c"\npretrained = false\n')
    env = {**os.environ, "INDEXER": str(Path(sys.executable).parent / "indexer")}
    script = JOBS / "cron" / "indexer-job.sh"
    with CollectionLock(tmp_path / "c", "build"):
        locked = subprocess.run([script, job], env=env, capture_output=True, text=True)
    assert locked.returncode == 0 and "skipped" in locked.stdout
    done = subprocess.run([script, job], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "with status 0" in done.stdout, done.stderr
    assert (tmp_path / "c" / "manifest.json").is_file()


def test_shipped_partition_examples(tmp_path: Path) -> None:
    parts, merge = yaml.safe_load_all((JOBS / "kubernetes" / "indexed-job.yaml").read_text())
    spec = parts["spec"]
    assert spec["completionMode"] == "Indexed"
    command = spec["template"]["spec"]["containers"][0]["args"][0]
    assert f'--partition "${{JOB_COMPLETION_INDEX}}/{spec["completions"]}"' in command
    assert merge["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["indexer", "index"]
    script = JOBS / "slurm" / "indexer-array.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert '--partition "$index/$count"' in script.read_text()


def test_shipped_rayjob_runs_the_ray_engine() -> None:
    (doc,) = yaml.safe_load_all((JOBS / "kubernetes" / "rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob"
    entry = doc["spec"]["entrypoint"].split()
    assert entry[:2] == ["indexer", "build"]
    params = parses(entry[2:])  # the flags exist and their values are valid
    assert params["engine"] == "ray" and params["concurrency"] == 4
