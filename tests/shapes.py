"""Data as other tools write it: img2dataset's webdataset and parquet outputs, generated."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from indexer.synthetic import scene

FIELDS = ("caption", "url", "key", "status", "error_message", "width", "height",
          "original_width", "original_height", "exif", "sha256")  # fmt: skip


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    scene(seed, (96 + seed % 5 * 8, 72)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sample_record(shard: int, i: int, failed: bool) -> dict:
    """One sample's record as img2dataset writes it (keys: shard then index, 9 digits)."""
    key = f"{shard:05d}{i:04d}"
    seed = shard * 1000 + i
    return {
        "caption": f"scene number {seed}",
        "url": f"http://127.0.0.1:9/img/{seed}.jpg",
        "key": key,
        "status": "failed_to_download" if failed else "success",
        "error_message": "HTTP Error 404: File not found" if failed else None,
        "width": None if failed else 96 + seed % 5 * 8,
        "height": None if failed else 72,
        "original_width": None if failed else 500 + seed,
        "original_height": None if failed else 375,
        "exif": None if failed else "{}",
        "sha256": None,
    }


def _table(records: list[dict], images: list[bytes | None] | None = None) -> pa.Table:
    columns = {f: [r[f] for r in records] for f in FIELDS}
    types = {"width": pa.int32(), "height": pa.int32(), "original_width": pa.int32(),
             "original_height": pa.int32()}  # fmt: skip
    arrays = [pa.array(columns[f], types.get(f, pa.string())) for f in FIELDS]
    names = list(FIELDS)
    if images is not None:
        arrays.append(pa.array(images, pa.binary()))
        names.append("jpg")
    return pa.Table.from_arrays(arrays, names=names)


def write_webdataset(
    folder: Path, shard: int, count: int, failed: tuple[int, ...] = (), sidecar: bool = True
) -> dict[str, bytes]:
    """NNNNN.tar (KEY.jpg, KEY.json, KEY.txt per fetched sample, in a shuffled order, as
    img2dataset's threads finish them) and its sidecar NNNNN.parquet; the images by key."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [sample_record(shard, i, i in failed) for i in range(count)]
    images: dict[str, bytes] = {}
    order = sorted(range(count), key=lambda i: (i * 7) % count)  # not the key order
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
        for i in order:
            record = records[i]
            if record["status"] != "success":
                continue
            data = jpeg(shard * 1000 + i)
            images[record["key"]] = data
            for ext, payload in (("jpg", data), ("json", json.dumps(record).encode()),
                                 ("txt", record["caption"].encode())):  # fmt: skip
                info = tarfile.TarInfo(f"{record['key']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    if sidecar:
        pq.write_table(_table(records), folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": count}))
    return images


def write_i2d_parquet(
    folder: Path, shard: int, count: int, failed: tuple[int, ...] = ()
) -> dict[str, bytes]:
    """NNNNN.parquet with the image bytes in a binary jpg column (null where the download
    failed) and NNNNN_stats.json; the images by key."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [sample_record(shard, i, i in failed) for i in range(count)]
    images = [None if i in failed else jpeg(shard * 1000 + i) for i in range(count)]
    pq.write_table(_table(records, images), folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": count}))
    return {r["key"]: b for r, b in zip(records, images, strict=True) if b is not None}


def write_folder(folder: Path, images: dict[str, bytes]) -> Path:
    """The same bytes as plain files KEY.jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, data in images.items():
        (folder / f"{key}.jpg").write_bytes(data)
    return folder
