"""Predicted labels as data: the classifier's top-K from the same forward, filterable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from tests.helpers import run_cli, seeded_model
from tests.test_pooling import timm_input


def test_labels_equal_timm_softmax_topk(corpus: Path, tmp_path: Path) -> None:
    source, out = corpus / "group2", tmp_path / "c"
    result = run_cli("build", source, "--out", out, "--no-pretrained", "--workers", "0",
                     "--no-progress", "--exact-preprocessing", "--labels", "5")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "shards").to_pylist()
    model = seeded_model(0)
    for row in rows:
        with torch.inference_mode():
            probs, idx = model(timm_input(model, source / row["key"])).softmax(-1).topk(5)
        assert row["label_index"] == idx[0].tolist()
        np.testing.assert_allclose(row["label_prob"], probs[0].numpy(), atol=1e-4)
        assert len(row["label_name"]) == 5 and all(row["label_name"])
    assert rows[0]["label_name"][0] != str(rows[0]["label_index"][0])  # ImageNet names
    top = rows[0]["label_name"][0]
    info = run_cli("info", out)
    assert f"labels:      {top}" in info.output or f", {top} " in info.output, info.output
    image = source / rows[0]["key"]
    kept = run_cli("query", image, "--index", out, "--where", f"label={top}", "--json")
    results = json.loads(kept.output)[0]["results"]
    assert results and all(r["label_name"][0] == top for r in results)
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1))
    bad = run_cli("query", image, "--index", out, "--where", "colour=red")
    assert bad.exit_code == 2 and "no column 'colour'" in bad.output


def test_labels_need_a_classifier(corpus: Path, tmp_path: Path) -> None:
    model = seeded_model(0)
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("head.fc")}
    save_file(trunk, str(tmp_path / "trunk.safetensors"))
    base = ("build", corpus / "group3", "--out", tmp_path / "c", "--workers", "0",
            "--checkpoint", tmp_path / "trunk.safetensors")  # fmt: skip
    refused = run_cli(*base, "--labels", "3")
    assert refused.exit_code == 4 and "no classifier head" in refused.output, refused.output
    assert run_cli(*base).exit_code == 0  # embeddings need no head
    plain = run_cli("query", corpus / "group3" / "scene0003.jpg", "--index", tmp_path / "c",
                    "--where", "label=tench")  # fmt: skip
    assert plain.exit_code == 2 and "--labels K" in plain.output
