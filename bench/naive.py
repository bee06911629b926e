"""Baseline 'naive': the model card's recipe, one image at a time (open -> timm transform -> model).

Usage: python bench/naive.py IMAGES_DIR CHECKPOINT OUT.parquet
"""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

MODEL = "test_convnext.r160_in1k"


def main() -> None:
    root, checkpoint, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    model = timm.create_model(MODEL, pretrained=False)
    model.load_state_dict(load_file(checkpoint))
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    keys, vectors = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        img = Image.open(path).convert("RGB")
        with torch.inference_mode():
            x = transform(img).unsqueeze(0)
            emb = model.forward_head(model.forward_features(x), pre_logits=True)
        keys.append(path.relative_to(root).as_posix())
        vectors.append(emb[0].tolist())
    pq.write_table(pa.table({"key": keys, "embedding": vectors}), out)


if __name__ == "__main__":
    main()
