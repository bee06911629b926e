"""Safe by default: weights never run pickled code; a collection cannot reach outside itself."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from indexer.config import file_sha256
from tests.helpers import BUILD_FLAGS, copy_of, edit_manifest, run_cli


class Payload:
    """Pickles to a call of os.mkdir: loading it with plain pickle would make a folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"stem.0.weight": Payload(marker)}}, path)
    return path


def test_a_pickled_payload_in_weights_is_never_run(corpus: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.pth", marker)
    result = run_cli("build", corpus, "--out", tmp_path / "c", *BUILD_FLAGS, "--checkpoint", evil)
    assert result.exit_code == 4, result.output
    assert "cannot read checkpoint" in result.output and len(result.output.splitlines()) == 1
    assert not marker.exists()


def test_a_collection_pointing_at_a_payload_refuses_to_query(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.pth", marker)
    weights = {"kind": "checkpoint", "path": str(evil), "sha256": file_sha256(evil)}
    edit_manifest(copy, lambda manifest: manifest["model"].update(weights=weights))
    image = sorted(corpus.rglob("*.jpg"))[0]
    result = run_cli("query", image, "--index", copy, "--runtime", "torch")
    assert result.exit_code == 4 and "cannot read checkpoint" in result.output, result.output
    assert not marker.exists()


def test_leftover_build_folders_that_are_links_are_not_followed(
    collection: Path, corpus: Path, tmp_path: Path
) -> None:
    copy = copy_of(collection, tmp_path)
    precious = tmp_path / "precious"
    (precious / "shards").mkdir(parents=True)
    (precious / "shards" / "part-v000009-00000.parquet").write_bytes(b"keep me")
    (copy / "versions" / ".building-v000009").symlink_to(precious)
    result = run_cli("build", corpus, "--out", copy, *BUILD_FLAGS, "--rebuild")
    assert result.exit_code == 0, result.output
    assert (precious / "shards" / "part-v000009-00000.parquet").read_bytes() == b"keep me"
    assert not (copy / "versions" / ".building-v000009").exists()
