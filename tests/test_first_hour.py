"""What a newcomer meets first: each command says what it did and where, random weights are
said where results are shown, and `indexer serve` prints the address to open once ready."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import BUILD_FLAGS, run_cli

INDEXER = str(Path(sys.executable).parent / "indexer")
NOTE = "Note: random weights: neighbours reflect colour and texture, not content"


@pytest.fixture(scope="module")
def built(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("first-hour") / "c"
    assert run_cli("build", corpus / "group1", "--out", out, *BUILD_FLAGS).exit_code == 0
    return out


def test_a_build_counts_what_it_did_and_rates_what_it_embedded(
    corpus: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus / "group0", src)
    out = tmp_path / "c"
    first = run_cli("build", src, "--out", out, *BUILD_FLAGS)
    n = len(list(src.iterdir()))
    assert first.stdout.startswith(f"Built {out}, version 1: {n} embedded, 0 reused"), first.stdout
    assert "images/s embedded" in first.stdout
    assert first.stderr.strip() == NOTE + " (build with pretrained weights, or --checkpoint " \
        "FILE, to search by content)."  # fmt: skip
    victim = sorted(src.iterdir())[0]
    victim.rename(src / f"renamed-{victim.name}")  # the same bytes under another key
    second = run_cli("build", src, "--out", out, *BUILD_FLAGS)
    assert (f"0 embedded, 1 reused (renamed or copied), {n - 1} unchanged, 1 deleted, 0 failed "
            f"of {n} listed (1 new, 0 changed)") in second.stdout, second.stdout  # fmt: skip
    assert "images/s" not in second.stdout  # nothing embedded: no rate to give
    assert NOTE not in second.output  # nothing embedded, no results shown


def test_query_and_dedup_say_random_weights_and_name_the_files_they_write(
    built: Path, corpus: Path, tmp_path: Path
) -> None:
    image = sorted((corpus / "group1").iterdir())[0]
    grid = tmp_path / "sheet.png"
    query = run_cli("query", image, "--index", built, "-k", "2", "--grid", grid)
    assert query.exit_code == 0, query.output
    assert query.stderr.startswith(NOTE) and f"Wrote the contact sheet to {grid}." in query.stderr
    assert query.stdout.startswith("query: ") and grid.is_file()
    as_json = run_cli("query", image, "--index", built, "-k", "2", "--json")
    assert as_json.stderr == "" and as_json.stdout.lstrip().startswith("[")  # for a program
    out, grid = tmp_path / "dups.parquet", tmp_path / "groups.png"
    dedup = run_cli("dedup", built, "--out", out, "--grid", grid)
    assert dedup.exit_code == 0, dedup.output
    assert f"written to {out}" in dedup.stdout and NOTE in dedup.stderr
    assert f"to {grid}." in dedup.stderr and grid.is_file()


def test_dedups_help_explains_its_default_threshold() -> None:
    text = " ".join(run_cli("dedup", "--help").output.split())
    assert "0.95 suits pretrained weights" in text and "random weights" in text


def test_verbose_shows_indexers_progress_not_the_libraries(corpus: Path, tmp_path: Path) -> None:
    done = subprocess.run([INDEXER, "-v", "build", corpus / "group2", "--out", tmp_path / "c",
                           *BUILD_FLAGS], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    loggers = {line.split()[3].rstrip(":") for line in done.stderr.splitlines()
               if line[:2] == "20" and " INFO " in line}  # fmt: skip
    assert loggers and all(name.startswith("indexer") for name in loggers), loggers


@pytest.mark.slow
def test_serve_says_what_it_serves_and_where_once_ready(built: Path) -> None:
    proc = subprocess.Popen([INDEXER, "serve", str(built), "--port", "0"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        served = proc.stdout.readline()
        assert served.startswith(f"c: {built} (version v000001, ") and "items)" in served
        assert "random weights" in served
        ready = proc.stdout.readline()
        assert ready.startswith("Ready: open http://127.0.0.1:"), ready
        url = ready.split()[2]
        with urllib.request.urlopen(url + "healthz", timeout=30) as answer:
            assert answer.status == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "INFO" not in err and "faiss" not in err, err  # nothing else at the default level


def test_a_first_dry_run_estimates_from_what_this_machine_timed(
    corpus: Path, tmp_path: Path, fresh_cache: Path
) -> None:
    src = corpus / "group2"
    dry = run_cli("build", src, "--out", tmp_path / "new", "--dry-run", *BUILD_FLAGS)
    assert dry.exit_code == 0 and "no estimate yet: nothing was timed" in dry.output, dry.output
    assert not (tmp_path / "new").exists()
    assert run_cli("build", src, "--out", tmp_path / "first", *BUILD_FLAGS).exit_code == 0
    dry = run_cli("build", src, "--out", tmp_path / "new", "--dry-run", *BUILD_FLAGS)
    assert "of embedding at the rate this machine timed for this model" in dry.output, dry.output
    assert not (tmp_path / "new").exists()


def test_the_readmes_first_screen_installs_and_says_how_to_skip_cuda_torch() -> None:
    first_screen = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    text = "\n".join(first_screen[:60])
    assert "pip install ." in text and "'.[s3]'" in text  # the extras named with it
    assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_progress_help_says_how_to_get_the_bar_in_logs() -> None:
    text = " ".join(run_cli("build", "--help").output.split())
    assert "only on a terminal; --progress shows it in logs and CI too" in text


def test_a_parquet_build_prints_the_summary_alone(tmp_path: Path) -> None:
    """datasets' own bars ("Generating train split") stay off, --progress or not."""
    import datasets
    from PIL import Image

    pictures = [Image.new("RGB", (40, 30), (20 * i, 90, 160)) for i in range(4)]
    data = datasets.Dataset.from_dict({"image": pictures, "caption": list("abcd")})
    (tmp_path / "ds").mkdir()
    data.cast_column("image", datasets.Image()).to_parquet(tmp_path / "ds" / "train.parquet")
    result = run_cli("build", tmp_path / "ds", "--out", tmp_path / "c", *BUILD_FLAGS)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and "Generating" not in result.output
    assert result.stderr.strip().startswith(NOTE)
    shown = run_cli("build", tmp_path / "ds", "--out", tmp_path / "d", *BUILD_FLAGS, "--progress")
    assert shown.exit_code == 0 and "Generating" not in shown.output, shown.output
