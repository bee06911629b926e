"""Baseline 'script': a competent user's batch script with a DataLoader (2 workers, batch 64).

Usage: python bench/script.py IMAGES_DIR CHECKPOINT OUT.parquet

Self-contained on purpose, like a user's own script (it shares its model setup with naive.py
as two users' scripts would): it imports nothing from indexer or from the bench.
"""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

MODEL = "test_convnext.r160_in1k"


class Images(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def main() -> None:
    root, checkpoint, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    model = timm.create_model(MODEL, pretrained=False)
    model.load_state_dict(load_file(checkpoint))
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    loader = DataLoader(Images(paths, transform), batch_size=64, num_workers=2)
    chunks = []
    with torch.inference_mode():
        for x in loader:
            chunks.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    vectors = np.concatenate(chunks)
    keys = [p.relative_to(root).as_posix() for p in paths]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    pq.write_table(pa.table({"key": keys, "embedding": emb}), out)


if __name__ == "__main__":
    main()
