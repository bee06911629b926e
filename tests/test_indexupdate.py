"""Index updates: the previous version's index with ids removed and added instead of a rebuild,
its probe kept exact, the rules that rebuild instead, and from-parquet ids kept by key."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexer import Collection
from indexer.config import file_sha256
from indexer.index.faiss_index import PROBE_FILE, Vectors, load_probe
from indexer.index.index_type import choose_index
from indexer.index.tune import exact_neighbours_and_ties
from indexer.index.update import rebuild_reason
from tests.helpers import (
    BUILD_FLAGS,
    clustered_vectors,
    read_embeddings_by_key,
    run_cli,
    write_vectors,
)

DIM = 16
IVF = ("--index-type", "ivf")


def meta_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "current" / "index" / "meta.json").read_text())


def rows_of(out: Path) -> dict[str, int]:
    table = pq.read_table(out / "current" / "shards", columns=["key", "id"])
    return dict(zip(table.column("key").to_pylist(), table.column("id").to_pylist(), strict=True))


def day(path: Path, keys: list[str], vectors: np.ndarray) -> Path:
    return write_vectors(path, vectors, keys)


@pytest.fixture
def days(tmp_path: Path) -> dict[str, Any]:
    """Day 1 (4,000 vectors) and day 2: 40 keys deleted, 40 given new vectors, 40 added."""
    n = 4000
    base = clustered_vectors(n, DIM, 40, 0.3, seed=1)
    keys = [f"k{i:05d}" for i in range(n)]
    changed = clustered_vectors(40, DIM, 40, 0.3, seed=2)
    added = clustered_vectors(40, DIM, 40, 0.3, seed=3)
    day2_vectors = np.concatenate([base[40:80] * 0 + changed, base[80:], added])
    day2_keys = keys[40:] + [f"new{i:03d}" for i in range(40)]
    return {
        "day1": day(tmp_path / "day1.parquet", keys, base),
        "day2": day(tmp_path / "day2.parquet", day2_keys, day2_vectors),
        "keys2": day2_keys,
        "vectors2": day2_vectors,
        "base": base,
    }


def test_rebuild_reasons_from_a_table() -> None:
    ivf = choose_index(200_000, 64, 16 << 30, "auto")
    meta = {"type": "ivf", "factory": ivf.factory, "on_disk": False}
    hnsw = {"type": "hnsw", "factory": "IDMap,HNSW32,Flat", "on_disk": False}
    table = [
        (meta, ivf, False, None, None),
        (meta, ivf, False, 0.2, None),  # the share itself is still an update
        (meta, ivf, False, 0.21, "21.0% of the vectors changed (more than 20%)"),
        (None, ivf, False, None, "the previous version has no readable index"),
        (meta, ivf, True, None, "the index settings changed"),
        (hnsw, ivf, False, None, "an HNSW index cannot remove vectors"),
        ({"type": "factory", "factory": "IVF64,PQ4"}, ivf, False, None, "is not updated in place"),
        (meta, choose_index(3_000_000, 64, 16 << 30, "auto"), False, None, "now calls for IVF8192"),
        (meta, choose_index(200_000, 64, 1 << 20, "auto"), False, None, "on disk"),
        ({**meta, "on_disk": True}, ivf, False, None, "on-disk inverted lists cannot"),
        ({"type": "flat", "factory": "IDMap,Flat"}, ivf, False, None, "now calls for IVF2048"),
    ]
    for recorded, choice, changed, share, expected in table:
        got = rebuild_reason(recorded, choice, changed, 0.2, share)
        assert (got is None) == (expected is None), (recorded, got)
        assert expected is None or expected in got, got


def test_a_small_change_updates_the_index_and_keeps_ids_by_key(days: dict[str, Any]) -> None:
    out = days["day1"].parent / "vectors"
    assert run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF).exit_code == 0
    before, first = rows_of(out), meta_of(out)
    assert first["how"] == "rebuilt" and first["why"] == "no previous version"
    result = run_cli("index", "--from-parquet", days["day2"], "--out", out, *IVF)
    assert result.exit_code == 0, result.output
    assert "updated from v000001" in result.output
    meta, after = meta_of(out), rows_of(out)
    assert meta["how"] == "updated" and meta["from_version"] == "v000001"
    assert (meta["removed"], meta["added"]) == (80, 80)  # 40 deleted + 40 changed; 40 + 40 new
    assert meta["factory"] == first["factory"] and meta["target_met"]
    assert meta["params"]["nprobe"] >= first["params"]["nprobe"]  # re-tuned up only
    # ids: kept keys keep theirs, new keys take unused ones, none repeats
    assert all(after[k] == before[k] for k in days["keys2"] if k in before)
    new_ids = [after[k] for k in days["keys2"] if k not in before]
    assert len(new_ids) == 40 and min(new_ids) >= len(before)
    assert len(set(after.values())) == len(after) == len(days["keys2"])
    # the index holds exactly the version's vectors: each stored vector finds itself
    collection = Collection.open(out)
    assert collection.index.ntotal == len(after)
    collection.set_search_params({"nprobe": meta["nlist"]})  # exhaustive: exact for IVF Flat
    _, keys = collection.search(days["vectors2"], k=1)
    assert keys[:, 0].tolist() == days["keys2"]
    assert run_cli("verify", out).exit_code == 0


def test_the_updated_probe_equals_an_exact_one(days: dict[str, Any]) -> None:
    out = days["day1"].parent / "vectors"
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF)
    run_cli("index", "--from-parquet", days["day2"], "--out", out, *IVF)
    current = (out / "current").resolve()
    manifest = json.loads((current / "manifest.json").read_text())
    probe = load_probe(current / "index", DIM)
    assert probe is not None and len(probe.ids) == 1000
    new_ids = {rows_of(out)[k] for k in days["keys2"][-40:]}
    assert len(new_ids & set(probe.ids.tolist())) >= 40 // 2  # new vectors are among the queries
    shards = sorted((current / "shards").glob("*.parquet"))
    vectors = Vectors(shards, [pq.read_metadata(p).num_rows for p in shards], DIM, "ip")
    truth, _ = exact_neighbours_and_ties(vectors.batches, probe.ids, probe.queries, 10, "ip")
    assert probe.pool_ids is not None
    found = probe.pool_ids[:, :10].tolist()
    assert all(set(a) == set(b) for a, b in zip(found, truth.tolist(), strict=True))
    assert manifest["counts"]["embedded"] == vectors.total


def test_many_changes_rebuild_and_say_why(days: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "vectors"
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF)
    keys = [f"k{i:05d}" for i in range(4000)]
    moved = clustered_vectors(1200, DIM, 40, 0.3, seed=9)
    vectors = np.concatenate([moved, days["base"][1200:]])
    day(tmp_path / "day3.parquet", keys, vectors)
    assert run_cli("index", "--from-parquet", tmp_path / "day3.parquet", "--out", out,
                   *IVF).exit_code == 0  # fmt: skip
    meta = meta_of(out)
    assert meta["how"] == "rebuilt" and "30.0% of the vectors changed" in meta["why"]
    result = run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF, "--rebuild-index")
    assert result.exit_code == 0 and meta_of(out)["why"] == "asked for (--rebuild-index)"


def test_hnsw_is_rebuilt_and_flat_is_updated(days: dict[str, Any], tmp_path: Path) -> None:
    for kind, how in (("hnsw", "rebuilt"), ("flat", "updated")):
        out = tmp_path / kind
        flags = ("--index-type", kind)
        run_cli("index", "--from-parquet", days["day1"], "--out", out, *flags)
        assert run_cli("index", "--from-parquet", days["day2"], "--out", out, *flags).exit_code == 0
        assert meta_of(out)["how"] == how, meta_of(out)["why"]
        assert Collection.open(out).index.ntotal == len(days["keys2"])


def test_a_recall_below_target_after_an_update_rebuilds(days: dict[str, Any]) -> None:
    out = days["day1"].parent / "sq"
    flags = ("--index-type", "ivfsq", "--target-recall", "0.9999")  # SQ8 cannot reach it
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *flags)
    assert run_cli("index", "--from-parquet", days["day2"], "--out", out, *flags).exit_code == 0
    meta = meta_of(out)
    assert meta["how"] == "rebuilt" and "below the target 0.9999" in meta["why"]


def test_on_disk_lists_are_rebuilt_and_never_written_in_place(days: dict[str, Any]) -> None:
    out = days["day1"].parent / "disk"
    flags = ("--index-type", "ivf", "--max-index-memory", "64K")  # lists on disk
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *flags)
    first = (out / "current").resolve() / "index"
    assert meta_of(out)["on_disk"]
    sums = {p.name: file_sha256(p) for p in first.iterdir()}
    assert run_cli("index", "--from-parquet", days["day2"], "--out", out, *flags).exit_code == 0
    assert meta_of(out)["how"] == "rebuilt" and "on-disk" in meta_of(out)["why"]
    assert {p.name: file_sha256(p) for p in first.iterdir()} == sums  # v1 untouched
    collection = Collection.open(out)
    collection.set_search_params({"nprobe": meta_of(out)["nlist"]})
    assert collection.search(days["vectors2"][-5:], k=1)[1][:, 0].tolist() == days["keys2"][-5:]
    assert run_cli("verify", out).exit_code == 0


def test_a_damaged_updated_index_is_repaired(days: dict[str, Any]) -> None:
    out = days["day1"].parent / "vectors"
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF)
    run_cli("index", "--from-parquet", days["day2"], "--out", out, *IVF)
    probe = (out / "current").resolve() / "index" / PROBE_FILE
    data = bytearray(probe.read_bytes())
    data[-10] ^= 0xFF
    probe.write_bytes(bytes(data))
    assert run_cli("verify", out).exit_code != 0
    assert run_cli("verify", "--repair", out).exit_code == 0
    assert run_cli("verify", out).exit_code == 0
    assert meta_of(out)["how"] == "rebuilt"  # a damaged index is never updated
    assert Collection.open(out).index.ntotal == len(days["keys2"])


def test_an_image_build_updates_its_index(tmp_path: Path) -> None:
    from indexer.synthetic import write_corpus

    src = tmp_path / "src"
    write_corpus(src, 24, duplicates=0, seed=5)
    out = tmp_path / "photos"
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    victim = sorted(p for p in src.rglob("*") if p.is_file())[0]
    victim.unlink()
    write_corpus(tmp_path / "more", 3, duplicates=0, seed=6)
    for p in (tmp_path / "more").rglob("*"):
        if p.is_file():
            p.rename(src / f"more-{p.name}")
    assert run_cli("build", src, "--out", out, *BUILD_FLAGS).exit_code == 0
    meta = meta_of(out)
    assert meta["how"] == "updated" and (meta["removed"], meta["added"]) == (1, 3)
    collection = Collection.open(out)
    assert collection.index.ntotal == 26
    stored = read_embeddings_by_key(out)  # each stored image finds itself in the updated index
    _, found = collection.search(np.stack(list(stored.values())), k=1)
    assert found[:, 0].tolist() == list(stored) and victim.name not in stored
    assert run_cli("build", src, "--out", out, "--rebuild", *BUILD_FLAGS).exit_code == 0
    assert meta_of(out)["why"] == "asked for (--rebuild)"


def start_index(parquet: Path, out: Path) -> subprocess.Popen[bytes]:
    code = "import sys\nfrom indexer.cli.main import main\nmain(sys.argv[1:])"
    argv = ["index", "--from-parquet", str(parquet), "--out", str(out), *IVF, "--keep", "9"]
    return subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.slow
def test_sigkill_during_an_update_then_again(days: dict[str, Any]) -> None:
    out = days["day1"].parent / "vectors"
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF)
    first = (out / "current").resolve()
    sums = {p.name: file_sha256(p) for p in (first / "index").iterdir()}
    rng = np.random.default_rng(7)
    for _ in range(4):
        proc = start_index(days["day2"], out)
        time.sleep(float(rng.uniform(0.5, 3.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert (
            Collection.open(out).index.ntotal == Collection.open(out).manifest["counts"]["embedded"]
        )  # whichever version is current is whole
    result = run_cli("index", "--from-parquet", days["day2"], "--out", out, *IVF, "--keep", "9")
    assert result.exit_code == 0, result.output
    assert meta_of(out)["how"] == "updated"
    assert {p.name: file_sha256(p) for p in (first / "index").iterdir()} == sums
    rows = rows_of(out)
    assert sorted(rows) == sorted(days["keys2"]) and len(set(rows.values())) == len(rows)
    assert Collection.open(out).index.ntotal == len(rows)
    assert not [p for p in (out / "versions").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_queries_during_updating_publishes_never_fail_or_mix(days: dict[str, Any]) -> None:
    out = days["day1"].parent / "vectors"
    keep = ("--keep", "9")  # every version stays readable while the loop checks it
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF, *keep)
    stop, problems, hows = threading.Event(), [], set()

    def query_loop() -> None:
        while not stop.is_set():
            try:
                collection = Collection(out)
                assert collection.index.ntotal == collection.manifest["counts"]["embedded"]
                _, found = collection.search_ids(days["vectors2"][:20], k=5)
                own = pq.read_table(collection.version / "shards", columns=["id"])
                assert set(found.ravel().tolist()) <= set(own.column("id").to_pylist())
                hows.add(collection.index_meta.get("how"))
            except Exception as exc:
                problems.append(repr(exc))

    thread = threading.Thread(target=query_loop)
    thread.start()
    try:
        for n in range(4):  # day 2, day 1, day 2, day 1: each an update of the one before
            parquet = days["day2"] if n % 2 == 0 else days["day1"]
            assert (
                run_cli("index", "--from-parquet", parquet, "--out", out, *IVF, *keep).exit_code
                == 0
            )
            assert meta_of(out)["how"] == "updated"
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert hows == {"rebuilt", "updated"}


def test_training_samples_hardly_move_when_few_rows_change(days: dict[str, Any]) -> None:
    """Rebuilds train on the rows whose ids hash lowest: 2% of rows changed moves about 2% of
    the sample, so a rebuilt index is comparable with the updated one."""
    from indexer.index.faiss_index import id_hashes, lowest_hashes

    out = days["day1"].parent / "vectors"
    samples = []
    for parquet in (days["day1"], days["day2"]):
        run_cli("index", "--from-parquet", parquet, "--out", out, *IVF, "--rebuild-index")
        current = (out / "current").resolve()
        shards = sorted((current / "shards").glob("*.parquet"))
        vectors = Vectors(shards, [pq.read_metadata(p).num_rows for p in shards], DIM, "ip")
        positions, order = lowest_hashes(vectors, 1000, seed=0)
        ids = pq.read_table(current / "shards", columns=["id"]).column("id").to_numpy()
        ordered = np.concatenate([pq.read_table(p, columns=["id"]).column("id").to_numpy()
                                  for p in shards])  # fmt: skip
        picked = ordered[positions][order]
        assert np.all(np.diff(id_hashes(picked, 0).astype(np.float64)) >= 0)  # lowest first
        assert len(set(picked.tolist())) == 1000 and set(picked.tolist()) <= set(ids.tolist())
        samples.append(set(picked.tolist()))
    assert len(samples[0] & samples[1]) >= 950  # 80 of 4,000 ids changed: ~2% of the sample


def test_metadata_that_lies_about_the_index_type_rebuilds(days: dict[str, Any]) -> None:
    out = days["day1"].parent / "lied"
    run_cli("index", "--from-parquet", days["day1"], "--out", out, "--index-type", "ivfsq")
    path = (out / "current").resolve() / "index" / "meta.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "type": "ivf", "requested": "ivf",
                                "factory": meta["factory"].replace("SQ8", "Flat")}))  # fmt: skip
    checked = run_cli("verify", out)
    assert checked.exit_code != 0 and "its metadata says ivf" in checked.output
    assert run_cli("index", "--from-parquet", days["day2"], "--out", out, *IVF).exit_code == 0
    rebuilt = meta_of(out)
    assert rebuilt["how"] == "rebuilt" and "its metadata says ivf" in rebuilt["why"]
    assert Collection.open(out).index.ntotal == len(days["keys2"])


def _refresh_checksum(index_dir: Path, name: str) -> None:
    """Tampering that also fixes the recorded size and sha256 of the file it changed."""
    meta_path = index_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    path = index_dir / name
    meta["files"][name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["probe-bytes", "probe-nan", "index-truncated", "hnsw-as-ivf"])
def test_damage_with_matching_checksums_never_crashes_an_update(
    days: dict[str, Any], damage: str
) -> None:
    out = days["day1"].parent / damage
    flags = ("--index-type", "hnsw") if damage == "hnsw-as-ivf" else IVF
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *flags)
    index_dir = (out / "current").resolve() / "index"
    if damage == "probe-bytes":
        data = bytearray((index_dir / PROBE_FILE).read_bytes())
        data[len(data) // 2 : len(data) // 2 + 100] = bytes(100)
        (index_dir / PROBE_FILE).write_bytes(bytes(data))
        _refresh_checksum(index_dir, PROBE_FILE)
    elif damage == "probe-nan":
        with np.load(index_dir / PROBE_FILE) as saved:
            arrays = {k: saved[k] for k in saved.files}
        arrays["queries"] = np.full_like(arrays["queries"], np.nan)
        with open(index_dir / PROBE_FILE, "wb") as f:
            np.savez(f, **arrays)
        _refresh_checksum(index_dir, PROBE_FILE)
    elif damage == "index-truncated":
        with open(index_dir / "index.faiss", "r+b") as f:
            f.truncate(1000)
        _refresh_checksum(index_dir, "index.faiss")
    else:  # the metadata of an HNSW index made to claim IVF
        meta = json.loads((index_dir / "meta.json").read_text())
        ivf = choose_index(4000, DIM, 16 << 30, "ivf")
        meta.update(type="ivf", requested="ivf", factory=ivf.factory, nlist=ivf.nlist)
        (index_dir / "meta.json").write_text(json.dumps(meta))
    result = run_cli("index", "--from-parquet", days["day2"], "--out", out, *IVF)
    assert result.exit_code == 0, result.output
    meta = meta_of(out)
    if damage.startswith("probe"):  # the probe is measured again; the index is updated
        assert meta["how"] == "updated"
        probe = load_probe((out / "current").resolve() / "index", DIM)
        assert probe is not None and np.isfinite(probe.queries).all()
    else:
        assert meta["how"] == "rebuilt", meta["why"]
    collection = Collection.open(out)
    assert collection.index.ntotal == len(days["keys2"])
    assert run_cli("verify", out).exit_code == 0


def test_a_parquet_rerun_keeps_the_settings_it_was_indexed_with(days: dict[str, Any]) -> None:
    out = days["day1"].parent / "kept"
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF, "--metric", "l2")
    assert run_cli("index", "--from-parquet", days["day2"], "--out", out).exit_code == 0
    meta = meta_of(out)
    assert (meta["how"], meta["type"], meta["metric"]) == ("updated", "ivf", "l2")


def test_another_vector_length_or_a_planted_probe_link_never_updates_blindly(
    days: dict[str, Any], tmp_path: Path
) -> None:
    out = days["day1"].parent / "dims"
    run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF)
    index_dir = (out / "current").resolve() / "index"
    (index_dir / PROBE_FILE).unlink()  # a link to a file elsewhere where the probe was
    (tmp_path / "elsewhere.npz").write_bytes(b"not a probe")
    (index_dir / PROBE_FILE).symlink_to(tmp_path / "elsewhere.npz")
    assert load_probe(index_dir, DIM) is None
    wide = clustered_vectors(4000, 2 * DIM, 40, 0.3, seed=1)
    day(tmp_path / "wide.parquet", [f"k{i:05d}" for i in range(4000)], wide)
    result = run_cli("index", "--from-parquet", tmp_path / "wide.parquet", "--out", out, *IVF)
    assert result.exit_code == 0, result.output
    assert meta_of(out)["how"] == "rebuilt" and meta_of(out)["dim"] == 2 * DIM


def test_what_a_killed_run_left_is_cleared_once_one_publishes(days: dict[str, Any]) -> None:
    from indexer.collection.versions import REQUEST, new_shard_prefixes

    out = days["day1"].parent / "vectors"
    assert run_cli("index", "--from-parquet", days["day1"], "--out", out, *IVF).exit_code == 0
    killed = out / "versions" / ".building-v000002"  # as a run killed mid-copy leaves it
    (killed / "shards").mkdir(parents=True)
    (killed / REQUEST).write_text(json.dumps({"from_parquet": True}))
    shard = next((out / "current" / "shards").glob("*.parquet"))
    (killed / "shards" / f"{new_shard_prefixes(2)[0]}-00000.parquet").write_bytes(
        shard.read_bytes()
    )
    result = run_cli("index", "--from-parquet", days["day2"], "--out", out, *IVF)
    assert result.exit_code == 0, result.output
    assert not [p.name for p in (out / "versions").iterdir() if p.name.startswith(".")]
