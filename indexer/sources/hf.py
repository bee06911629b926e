"""A Hugging Face ``datasets`` dataset: a save_to_disk folder, local data files, or a hub name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from indexer.config import DEFAULT_MAX_PIXELS
from indexer.errors import InputError
from indexer.hub import hub_unreachable_reason
from indexer.safeio import byte_limit, read_bounded
from indexer.shards import metadata_names
from indexer.sources.folder import printable_key


class HFSource:
    """One split of a dataset; images are read as stored bytes (``decode=False``), decoded by us.

    An image stored as a path is read like a folder's file: a regular file only, and no more
    bytes than an image of ``max_pixels`` pixels can need.
    """

    def __init__(
        self,
        name: str,
        split: str | None = None,
        image_column: str | None = None,
        label: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        import datasets

        self.name = name
        dataset = _load(name)
        if isinstance(dataset, datasets.DatasetDict):
            self.split = _pick_split(name, list(dataset.keys()), split)
            dataset = dataset[self.split]
        else:
            self.split = _only_split(name, dataset.split, split)
        self.image_column = _pick_image_column(name, dataset.features, image_column)
        self.dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.columns = metadata_names(_metadata_columns(self.dataset, self.image_column))
        self.max_bytes = byte_limit(max_pixels)
        self.label = label or printable_key(Path(name.rstrip("/")).name or name)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "hf",
            "name": self.name,
            "split": self.split,
            "image_column": self.image_column,
            "rows": len(self.dataset),
            "fingerprint": self.dataset._fingerprint,
            "label": self.label,
        }

    def keys_and_locators(self) -> list[tuple[str, Any, tuple[int, int] | None]]:
        return [(f"{self.split}/{row}", row, None) for row in range(len(self.dataset))]

    def metadata_schema(self) -> pa.Schema:
        schema = self.dataset.data.schema
        return pa.schema(
            [pa.field(new, schema.field(name).type, nullable=True)
             for name, new in self.columns.items()]
        )  # fmt: skip

    def read(self, locator: Any) -> tuple[bytes, dict[str, Any]]:
        row = self.dataset[int(locator)]
        image = row[self.image_column] or {}
        data = image.get("bytes")
        if data is None and image.get("path"):
            data = read_bounded(image["path"], self.max_bytes)
        meta = {new: row[name] for name, new in self.columns.items()}
        return data or b"", meta


def _load(name: str) -> Any:
    import datasets

    path = Path(name).expanduser()
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        if path.is_dir():
            return datasets.load_dataset(str(path))
        if path.exists():
            raise InputError(f"hf:{name} is a file; pass the dataset's folder or a hub name")
        if name.startswith((".", "/", "~")):
            raise InputError(f"dataset folder {name} does not exist: check the path")
        reason = hub_unreachable_reason()
        if reason:
            raise InputError(
                f"dataset {name} is not a local folder and the hub is unreachable ({reason}): "
                "pass a save_to_disk folder or a folder of data files"
            )
        return datasets.load_dataset(name)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot open dataset {name}: {type(exc).__name__}: {exc}") from exc


def _pick_split(name: str, splits: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in splits:
            raise InputError(f"dataset {name} has no split '{wanted}'; choose one of {splits}")
        return wanted
    if len(splits) == 1:
        return splits[0]
    if "train" in splits:
        return "train"
    raise InputError(f"dataset {name} has splits {splits}: choose one with --split")


def _only_split(name: str, split: Any, wanted: str | None) -> str:
    """A dataset without splits: its one split is named as saved, else 'train'."""
    only = str(split) if split else "train"
    if wanted is not None and wanted != only:
        raise InputError(
            f"dataset {name} has no split '{wanted}'; its only split is '{only}': drop --split"
        )
    return only


def _pick_image_column(name: str, features: Any, wanted: str | None) -> str:
    import datasets

    image_columns = [col for col, f in features.items() if isinstance(f, datasets.Image)]
    if wanted is not None:
        if wanted not in features:
            raise InputError(
                f"dataset {name} has no column '{wanted}'; its columns are {list(features)}"
            )
        if wanted not in image_columns:
            raise InputError(f"column '{wanted}' of dataset {name} is not an Image column")
        return wanted
    if len(image_columns) == 1:
        return image_columns[0]
    if not image_columns:
        raise InputError(
            f"dataset {name} has no Image column (columns: {list(features)}); "
            "name the column holding images with --image-column"
        )
    raise InputError(
        f"dataset {name} has several Image columns {image_columns}: choose one with --image-column"
    )


def _metadata_columns(dataset: Any, image_column: str) -> list[str]:
    """Scalar columns (numbers, strings, bools, class labels) are kept as shard columns."""
    schema = dataset.data.schema
    keep = []
    for field in schema:
        if field.name == image_column:
            continue
        t = field.type
        if (
            pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_boolean(t)
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
        ):
            keep.append(field.name)
    return keep
