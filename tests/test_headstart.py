"""The head start: the first batches decoded by a process forked before torch loads, handed
over to the DataLoader with no item decoded twice, none skipped, the order kept; a head start
that dies costs only its item; one whose build dies ends too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer.config import DataConfig, LoaderConfig, SourceSpec
from indexer.decode.head_start import HeadStart
from indexer.decode.item_dataset import loader_work
from indexer.decode.preprocess import Preprocessor
from indexer.sources import list_items, open_sources
from indexer.synthetic import write_corpus
from tests.helpers import read_embeddings_by_key, run_cli
from tests.hooks import use_decode_hook

CFG = DataConfig((3, 64, 64), "bicubic", 0.875, "center", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("head") / "src"
    write_corpus(root, 40, seed=3)
    return root


def batches(root: Path, loader: LoaderConfig, head_batches: int | None) -> list:
    """Every batch of a folder: with a head start that has claimed `head_batches` first (None:
    without one)."""
    from indexer.decode.loader import iter_batches

    sources = open_sources((SourceSpec(str(root)),))
    items = list_items(sources)
    prep = Preprocessor(CFG, "fast")
    head = None
    if head_batches is not None:
        head = HeadStart.start(*loader_work(items, sources, prep, loader), loader)
        assert head is not None
        deadline = time.monotonic() + 60
        while head._claimed.value < head_batches and time.monotonic() < deadline:
            time.sleep(0.005)
    return list(iter_batches(items, sources, prep, loader, head=head))


def test_the_head_start_hands_over_with_nothing_twice_and_nothing_skipped(corpus: Path) -> None:
    loader = LoaderConfig(batch_size=4, workers=2)
    plain = batches(corpus, loader, None)
    headed = batches(corpus, loader, 3)
    positions = [p for b in headed for p in b.positions]
    assert positions == [p for b in plain for p in b.positions] == list(range(40))
    assert [len(b.positions) for b in headed] == [4] * 10  # the batches the loader would make
    for a, b in zip(plain, headed, strict=True):
        assert np.array_equal(a.pixels.numpy(), b.pixels.numpy())
        assert a.hashes == b.hashes and a.metadata == b.metadata


def test_a_head_start_that_took_everything_leaves_the_loader_nothing(corpus: Path) -> None:
    loader = LoaderConfig(batch_size=8, workers=2)
    headed = batches(corpus, loader, 5)  # all five batches claimed before the handover
    assert [p for b in headed for p in b.positions] == list(range(40))


def test_no_head_start_without_workers(corpus: Path) -> None:
    sources = open_sources((SourceSpec(str(corpus)),))
    items = list_items(sources)
    prep = Preprocessor(CFG, "fast")
    none = LoaderConfig(workers=0)
    assert HeadStart.start(*loader_work(items, sources, prep, none), none) is None
    two = LoaderConfig(workers=2)
    assert HeadStart.start(*loader_work([], sources, prep, two), two) is None


def test_a_head_start_that_dies_costs_only_its_item(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder crash in the head start's first batch: that batch is decoded again item by
    item, each in a process of its own; the crashing item is an error row, the rest embed."""
    import shutil

    root = tmp_path / "src"
    shutil.copytree(corpus, root)
    shutil.copy(root / "group1" / "scene0005.png", root / "group0" / "a-crash-me.png")
    use_decode_hook(monkeypatch, "tests.hooks:hostile")
    loader = LoaderConfig(batch_size=4, workers=2, decode_hook="tests.hooks:hostile")
    headed = batches(root, loader, 1)
    errors = [e for b in headed for e in b.errors]
    assert len(errors) == 1 and "crashed (SIGSEGV)" in errors[0][2]
    good = sorted(p for b in headed for p in b.positions)
    assert sorted([*good, errors[0][0]]) == list(range(41))


ORPHAN = """
import os, sys, time
sys.path.insert(0, {repo!r})
from indexer.config import LoaderConfig, SourceSpec
from indexer.decode.item_dataset import loader_work
from indexer.decode.head_start import HeadStart
from indexer.decode.preprocess import DataConfig, Preprocessor
from indexer.sources import list_items, open_sources
sources = open_sources((SourceSpec({root!r}),))
items = list_items(sources)
prep = Preprocessor(DataConfig((3, 64, 64), "bicubic", 0.875, "center", (0.5,) * 3, (0.5,) * 3),
                    "fast")
cfg = LoaderConfig(batch_size=1, workers=2, decode_hook="tests.hooks:slow")
head = HeadStart.start(*loader_work(items, sources, prep, cfg), cfg)
print(head._process.pid, flush=True)
time.sleep(0.3)
os._exit(0)  # killed: no exit handlers end the head start
"""


def test_a_head_start_ends_with_its_build(corpus: Path) -> None:
    """The build process dies mid-way (SIGKILL, OOM): its head start stops after the item at
    hand instead of decoding on for nobody."""
    script = ORPHAN.format(repo=str(REPO), root=str(corpus))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=REPO)  # fmt: skip
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail("the head start outlived its build by 10 s")


def test_an_incremental_build_starts_decoding_before_torch(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the CLI: a run that embeds with the collection's portable model hands its first
    batches from the head start to the DataLoader, and its vectors are the ones a run without
    workers makes."""
    import shutil

    root = tmp_path / "src"
    shutil.copytree(corpus, root)
    flags = ("--no-pretrained", "--no-progress", "--precision", "fp32", "--batch-size", "4",
             "--runtime", "onnx")  # fmt: skip
    out = tmp_path / "c"
    assert run_cli("build", root, "--out", out, *flags, "--workers", "0").exit_code == 0
    write_corpus(root / "more", 24, seed=9)
    handed: list[tuple[int, int]] = []  # (items the head start took, items to embed)
    stop = HeadStart.stop

    def watched(head: HeadStart) -> int:
        taken = stop(head)
        handed.append((taken, len(head.todo)))
        return taken

    monkeypatch.setattr(HeadStart, "stop", watched)
    result = run_cli("build", root, "--out", out, *flags, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert handed and handed[0][1] == 24 and handed[0][0] % 4 == 0  # whole batches
    plain = tmp_path / "plain"
    assert run_cli("build", root, "--out", plain, *flags, "--workers", "0").exit_code == 0
    got, want = read_embeddings_by_key(out), read_embeddings_by_key(plain)
    assert got.keys() == want.keys() and len(got) == 64
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-5
    ids = pq.read_table(out / "shards").column("id").to_pylist()
    assert len(ids) == len(set(ids))
