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

from indexer.cli.build import build, build_config
from indexer.cli.jobs import check_setting, job_flags, read_job, toml_kind
from indexer.cli.main import main
from indexer.collection.lock import CollectionLock
from indexer.errors import InputError
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
        'index_type = "hnsw"\nmax_index_memory = "1G"\ntarget_recall = 0.9\nruntime = "torch"\n'
        'precision = "fp32"\n'
    )  # torch in both: a first build's first batch is torch's, later ones a cached export's
    result = run_cli("run", job_dir / "pics.toml")
    assert result.exit_code == 0, result.output
    from_job = tmp_path / "out" / "pics.idx"  # relative to the job file, not the cwd
    meta = json.loads((from_job / "index" / "meta.json").read_text())
    assert (meta["type"], meta["max_memory"], meta["target_recall"]) == ("hnsw", 1024**3, 0.9)
    flags = run_cli(
        "build",
        corpus / "group2",
        "--out",
        tmp_path / "flags",
        *BUILD_FLAGS,
        "--batch-size",
        "4",
        "--runtime",
        "torch",
    )  # the same batches, the same runtime: the same vectors
    assert flags.exit_code == 0
    a, b = read_embeddings_by_key(from_job), read_embeddings_by_key(tmp_path / "flags")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('sources = ["x"]\nout = "o"\nbogus = 1\n', "unknown setting(s) ['bogus']"),
        ('sources = ["x"]\nout = "o"\nworkers = -1\n', "Invalid value for '--workers'"),
        ('sources = ["x"]\nout = "o"\nmetric = "cos"\n', "Invalid value for '--metric'"),
        ('out = "o"\n', "Missing argument 'SOURCES...'"),
        ('sources = ["x"]\nout = "o"\npretrained = "yes"\n', "must be true or false"),
        ("sources = [\n", "not valid TOML"),
        ('sources = ["x"]\nout = "o"\nstorage_options = ["bad"]\n', "'bad': write KEY=VALUE"),
        ('sources = []\nout = "o"\n', "Missing argument 'SOURCES...'"),
    ],
)
def test_bad_job_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    result = run_cli("run", job)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and message in result.output
    assert result.output.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'out = "\xff"\n', "is not UTF-8 text (invalid start byte at line 1, byte 7): save it as"),
        (
            'sources = ["x"]\nout = "o"\nbatch-size = 1\nbatch_size = 2\n',
            "gives setting 'batch_size' twice, as 'batch-size' and 'batch_size': keep one",
        ),
        (
            'sources = "../src"\nout = "o"\n',
            "setting 'sources' must be a list of strings, not a string: "
            'write sources = ["../src"]',
        ),
        ('sources = ["x", 1]\nout = "o"\n', "'sources' must be a list of strings, not a list"),
        ('sources = ["x"]\nout = ["o"]\n', "setting 'out' must be a string, not an array"),
        ('sources = ["x"]\nout = "a\\u0000b"\n', "'out' must be a string, not one holding a NUL"),
        ('sources = ["x"]\nout = ""\n', "setting 'out' must not be empty"),
        ('sources = [""]\nout = "o"\n', "setting 'sources' must not be empty"),
        ('sources = ["x"]\nout = "o"\ncheckpoint = 1\n', "'checkpoint' must be a string"),
        ('sources = ["x"]\nout = "o"\nmetrics_file = {}\n', "'metrics_file' must be a string"),
        ('sources = ["x"]\nout = "o"\nsplit = 1\n', "'split' must be a string, not an integer"),
        ('sources = ["x"]\nout = "o"\nworkers = "2"\n', "'workers' must be an integer, not a"),
        (
            'sources = ["x"]\nout = "o"\nworkers = 2.0\n',
            "'workers' must be an integer, not a float",
        ),
        ('sources = ["x"]\nout = "o"\nseed = 1.5\n', "'seed' must be an integer, not a float"),
        ('sources = ["x"]\nout = "o"\nbatch-size = true\n', "'batch_size' must be an integer"),
        ('sources = ["x"]\nout = "o"\nmax_failures = "0.1"\n', "'max_failures' must be a number"),
        ('sources = ["x"]\nout = "o"\ntarget_recall = true\n', "'target_recall' must be a number"),
        ('sources = ["x"]\nout = "o"\nmetric = 1\n', "'metric' must be a string, not an integer"),
        ('sources = ["x"]\nout = "o"\nrebuild = 1\n', "'rebuild' must be true or false"),
    ],
)
def test_wrong_types_are_refused_before_anything_is_created(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    job = jobs / "job.toml"
    if isinstance(text, bytes):
        job.write_bytes(text)
    else:
        job.write_text(text)
    result = run_cli("run", job)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: job file {job}") and message in result.output
    assert result.output.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == [jobs, job]  # no `out`, however it was spelled


@pytest.mark.parametrize(
    ("param_type", "kind"),
    [
        (click.BOOL, "boolean"),
        (click.INT, "integer"),
        (click.IntRange(1), "integer"),
        (click.IntRange(0, 9, clamp=True), "integer"),
        (click.FLOAT, "number"),
        (click.FloatRange(0, 1, min_open=True), "number"),
        (click.STRING, "string"),
        (click.Choice(["ip", "l2"]), "string"),
        (click.Path(path_type=Path), "string"),
        (click.UUID, "string"),
        (click.DateTime(), "string"),
    ],
)
def test_toml_kind_of_click_types(param_type: click.ParamType, kind: str) -> None:
    assert toml_kind(param_type) == kind


def test_build_flags_have_the_expected_toml_kinds() -> None:
    kinds = {p.name: toml_kind(p.type) for p in build.params}
    expected = {
        "integer": "batch_size workers shard_size seed keep labels max_image_pixels concurrency "
        "feature_stage",
        "number": "max_failures decode_timeout target_recall",
        "string": "sources out checkpoint metrics_file model split image_column metric precision "
        "engine partition max_index_memory device",
        "boolean": "pretrained normalize rebuild progress dry_run exact_preprocessing",
    }
    for kind, names in expected.items():
        assert {n: kinds[n] for n in names.split()} == dict.fromkeys(names.split(), kind)


@pytest.mark.parametrize(
    ("value", "kind", "many", "expected"),
    [
        (True, "boolean", False, True),
        (3, "integer", False, 3),
        (3, "number", False, 3),
        (0.25, "number", False, 0.25),
        ("x y", "string", False, "x y"),
        (["a", "b"], "string", True, ["a", "b"]),
        ([], "string", True, []),
        (1, "boolean", False, "must be true or false, not an integer"),
        (False, "integer", False, "must be an integer, not a boolean"),
        (1.0, "integer", False, "must be an integer, not a float"),
        ("3", "integer", False, "must be an integer, not a string"),
        (True, "number", False, "must be a number, not a boolean"),
        ("0.5", "number", False, "must be a number, not a string"),
        (["x"], "string", False, "must be a string, not an array"),
        ({"a": 1}, "string", False, "must be a string, not a table"),
        ("a", "string", True, 'must be a list of strings, not a string: write s = ["a"]'),
        (["a", 2], "string", True, "must be a list of strings, not a list holding an integer"),
        ([1, True], "integer", True, "must be a list of integers, not a list holding a boolean"),
    ],
)
def test_check_setting(value: object, kind: str, many: bool, expected: object) -> None:
    job = Path("j.toml")
    if not (isinstance(expected, str) and expected.startswith("must ")):
        assert check_setting(job, "s", value, kind, many) == expected
    else:
        with pytest.raises(InputError) as info:
            check_setting(job, "s", value, kind, many)
        assert str(info.value) == f"job file j.toml: setting 's' {expected}"


def test_read_job_resolves_paths_against_the_job_folder(tmp_path: Path) -> None:
    job = tmp_path / "jobs" / "job.toml"
    job.parent.mkdir()
    job.write_text(
        'sources = ["../pics", "/abs", "hf:./ds", "hf:user/name"]\nout = "o.idx"\n'
        'checkpoint = "w/model.safetensors"\nmetrics-file = "../m.prom"\nmodel = "./not/a/path"\n'
    )
    settings = read_job(job)
    base = job.parent
    assert settings == {
        "sources": [str(base / "../pics"), "/abs", f"hf:{base / 'ds'}", "hf:user/name"],
        "out": str(base / "o.idx"),
        "checkpoint": str(base / "w/model.safetensors"),
        "metrics_file": str(base / "../m.prom"),
        "model": "./not/a/path",  # not a path setting: as written
    }
    params = job_flags(settings, job, build)
    assert params["out"] == base / "o.idx" and params["metrics_file"] == base / "../m.prom"
    assert params["sources"] == tuple(settings["sources"])


def test_read_job_accepts_a_utf8_byte_order_mark(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_bytes('\ufeffsources = ["é"]\nout = "o"\n'.encode())
    assert read_job(job)["sources"] == [str(tmp_path / "é")]


def test_read_job_names_the_line_of_a_non_utf8_byte(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_bytes('sources = ["x"]\nout = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(InputError) as info:
        read_job(job)
    assert str(info.value) == (
        f"job file {job} is not UTF-8 text (invalid continuation byte at line 2, byte 26): "
        "save it as UTF-8"
    )


def test_read_job_refuses_a_setting_under_three_spellings(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("max-index-memory = '1G'\nmax_index_memory = '2G'\nmax-index_memory = '3G'\n")
    with pytest.raises(InputError, match="'max-index-memory' and 'max_index_memory' and 'max-i"):
        read_job(job)


def test_numbers_and_integers_reach_click_as_typed(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        'sources = ["s"]\nout = "o"\nmax_failures = 3\ndecode_timeout = 0\ntarget_recall = 0.5\n'
        'seed = 7\nfeature-stage = 2\nmetric = "l2"\nprogress = false\nsplit = "--test"\n'
    )
    params = job_flags(read_job(job), job, build)
    numbers = (params["max_failures"], params["decode_timeout"], params["target_recall"])
    assert numbers == (3.0, 0.0, 0.5)
    assert (params["seed"], params["feature_stage"], params["metric"]) == (7, 2, "l2")
    assert params["progress"] is False and params["split"] == "--test"


def test_shipped_example_and_configmap_are_valid_jobs(tmp_path: Path) -> None:
    params = job_flags(read_job(JOBS / "example.toml"), JOBS / "example.toml", build)
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
    assert job_flags(read_job(job), job, build)["sources"] == ("/data/photos",)
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


def test_a_job_and_its_flags_make_the_same_config(tmp_path: Path) -> None:
    """A job file goes straight into the build's configuration, the same one its flags make;
    every setting left out is the flag's default."""
    job = tmp_path / "job.toml"
    job.write_text(
        'sources = ["pics", "hf:user/set"]\nout = "o.idx"\nbatch_size = 8\nworkers = 0\n'
        'pretrained = false\nmetric = "l2"\nindex_type = "hnsw"\ntarget_recall = 0.9\n'
        'storage_options = ["anon=true"]\nexact_preprocessing = true\npartition = "1/4"\n'
    )
    from_job = build_config(job_flags(read_job(job), job, build))
    argv = [str(tmp_path / "pics"), "hf:user/set", "--out", str(tmp_path / "o.idx"),
            "--batch-size", "8", "--workers", "0", "--no-pretrained", "--metric", "l2",
            "--index-type", "hnsw", "--target-recall", "0.9", "--storage-option", "anon=true",
            "--exact-preprocessing", "--partition", "1/4"]  # fmt: skip
    assert from_job == build_config(parses(argv))
    assert from_job.model.precision == "fp32" and from_job.loader.preprocessing == "exact"
    assert from_job.sources[0].storage_options == (("anon", "true"),)
    assert from_job.partition is not None and from_job.loader.decode == "auto"
