"""A Hugging Face dataset: a save_to_disk folder, data files (local or in a bucket), a hub name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from indexer.collection.shards import FIXED_COLUMNS, metadata_names
from indexer.config import DEFAULT_MAX_PIXELS
from indexer.errors import InputError
from indexer.hub import hub_unreachable_reason
from indexer.safeio import byte_limit, read_bounded
from indexer.sources.base import SampleFailed
from indexer.sources.folder import printable_key
from indexer.sources.wds import SUCCESS


class HFSource:
    """One split of a dataset; images are read as stored bytes (``decode=False``), decoded by us.

    The image column is an Image column or a column of image bytes (img2dataset's ``jpg``).
    Rows img2dataset could not fetch (``status`` other than success) and rows without image
    bytes are error rows, with their url. An image stored as a path is read like a folder's
    file: a regular file only, and no more bytes than an image of ``max_pixels`` can need.
    """

    def __init__(
        self,
        name: str,
        split: str | None = None,
        image_column: str | None = None,
        label: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        key_column: str | None = None,
        files: tuple[str, ...] | None = None,
    ) -> None:
        import datasets

        local = Path(name).expanduser()
        self.name = str(local.resolve()) if local.exists() and files is None else name
        dataset = _load(name) if files is None else _load_files(name, files)
        if isinstance(dataset, datasets.DatasetDict):
            self.split = _pick_split(name, list(dataset.keys()), split)
            dataset = dataset[self.split]
        else:
            self.split = _only_split(name, dataset.split, split)
        self.image_column = _pick_image_column(name, dataset.features, image_column)
        if isinstance(dataset.features[self.image_column], datasets.Image):
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.key_column = _pick_key_column(name, dataset, key_column, self.image_column)
        kept = _metadata_columns(self.dataset, self.image_column)
        self.columns = metadata_names(kept)
        self.class_names = _class_names(dataset.features, kept, set(self.columns.values()))
        self.max_bytes = byte_limit(max_pixels)
        self.label = label or printable_key(Path(name.rstrip("/")).name or name)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "hf",
            "name": self.name,
            "split": self.split,
            "image_column": self.image_column,
            "key_column": self.key_column,
            "rows": len(self.dataset),
            "fingerprint": self.dataset._fingerprint,
            "label": self.label,
        }

    def keys_and_locators(self) -> list[tuple[str, Any, tuple[int, int] | None]]:
        rows = range(len(self.dataset))
        if self.key_column is None:
            return [(f"{self.split}/{row}", row, None) for row in rows]
        keys = _key_values(self.dataset, self.key_column, self.image_column, self.name)
        return [(printable_key(key), row, None) for key, row in zip(keys, rows, strict=True)]

    def metadata_schema(self) -> pa.Schema:
        schema = self.dataset.data.schema
        fields = [pa.field(new, schema.field(name).type, nullable=True)
                  for name, new in self.columns.items()]  # fmt: skip
        fields += [pa.field(new, pa.string(), nullable=True) for new in self.class_names.values()]
        return pa.schema(fields)

    def read(self, locator: Any) -> tuple[bytes, dict[str, Any]]:
        row = self.dataset[int(locator)]
        status = row.get("status") if "error_message" in row else None  # img2dataset's
        if isinstance(status, str) and status != SUCCESS:  # a row it could not fetch
            raise SampleFailed(f"not fetched by its downloader ({status}: "
                               f"{row.get('error_message') or 'no message'})")  # fmt: skip
        image = row[self.image_column]
        data = image.get("bytes") if isinstance(image, dict) else image
        if data is None and isinstance(image, dict) and image.get("path"):
            data = read_bounded(image["path"], self.max_bytes)
        if data is None:  # (empty bytes are read, and fail to decode as an empty file)
            missing = f"the row has no image in column {self.image_column!r}"
            raise SampleFailed(missing) if status is not None else ValueError(missing)
        meta = {new: row[name] for name, new in self.columns.items()}
        for name, new in self.class_names.items():
            meta[new] = _class_name(self.dataset.features[name], row[name])
        return bytes(data), meta

    def url(self, locator: Any) -> str | None:
        if "url" not in self.dataset.column_names:
            return None
        value = self.dataset[int(locator)]["url"]
        return value if isinstance(value, str) else None


def _load_files(name: str, files: tuple[str, ...]) -> Any:
    """Parquet files (a bucket prefix's, staged locally by their ETag) as one dataset."""
    import datasets

    try:
        with _quiet():
            return datasets.load_dataset("parquet", data_files=list(files))
    except Exception as exc:  # a file that is not Parquet, or Parquet files that disagree
        raise InputError(f"cannot open the Parquet files under {name}: {_gist(exc)}: check "
                         "them") from None  # fmt: skip


@contextmanager
def _quiet() -> Iterator[None]:
    """datasets' own progress bars ("Generating train split") off while it loads: the
    build's bar is the one a user sees (and --no-progress means none)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _gist(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _load(name: str) -> Any:
    import datasets

    path = Path(name).expanduser()
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            with _quiet():
                return datasets.load_from_disk(str(path))
        if path.is_dir():
            with _quiet():
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
        with _quiet():
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


BYTES_NAMES = ("jpg", "jpeg", "png", "webp", "image", "img")  # image-bytes columns found alone


def _is_bytes(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")


def _pick_image_column(name: str, features: Any, wanted: str | None) -> str:
    import datasets

    image_columns = [col for col, f in features.items() if isinstance(f, datasets.Image)]
    if wanted is not None:
        if wanted not in features:
            raise InputError(
                f"dataset {name} has no column '{wanted}'; its columns are {list(features)}"
            )
        if wanted not in image_columns and not _is_bytes(features[wanted]):
            raise InputError(
                f"column '{wanted}' of dataset {name} holds neither images nor image bytes "
                f"({features[wanted]}): name an Image column or a binary one"
            )
        return wanted
    if not image_columns:  # img2dataset's parquet: the image bytes in a binary 'jpg' column
        image_columns = [c for c, f in features.items() if _is_bytes(f) and c in BYTES_NAMES]
    if len(image_columns) == 1:
        return image_columns[0]
    if not image_columns:
        raise InputError(
            f"dataset {name} has no Image column (columns: {list(features)}); "
            "name the column holding images (or image bytes) with --image-column"
        )
    raise InputError(
        f"dataset {name} has several Image columns {image_columns}: choose one with --image-column"
    )


KEY_COLUMNS = ("key", "file_name")  # img2dataset's, a metadata file's: the keys by default


def _pick_key_column(name: str, dataset: Any, wanted: str | None, image: str) -> str | None:
    """The column whose values are the keys: the one asked for, else key, else file_name,
    else the image column when it holds files' paths (imagefolder); None: SPLIT/ROW."""
    if wanted is not None:
        if wanted not in dataset.column_names:
            raise InputError(
                f"--key-column {wanted}: dataset {name} has no such column; its columns are "
                f"{dataset.column_names}"
            )
        return wanted
    found = next((c for c in KEY_COLUMNS if c in dataset.column_names), None)
    if found is not None:
        return found
    return image if _image_paths(dataset, image) is not None else None


def _image_paths(dataset: Any, image: str) -> list[str] | None:
    """The image files' paths, relative to their common folder, when every row has a
    distinct one (a dataset made from files); else None."""
    column = dataset.data.column(image)
    if not pa.types.is_struct(column.type) or column.type.get_field_index("path") < 0:
        return None
    paths = column.combine_chunks().field("path").to_pylist()
    if not paths or any(not p for p in paths) or len(set(paths)) != len(paths):
        return None
    import os

    common = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    if common == os.sep:  # files from all over the disk: no folder of their own
        return None
    return [os.path.relpath(p, common) if common else p for p in paths]


def _key_values(dataset: Any, column: str, image: str, name: str) -> list[str]:
    """Every row's key from the key column (or the image files' paths), all distinct."""
    values = (
        _image_paths(dataset, image) if column == image else dataset.data.column(column).to_pylist()
    )
    if values is None:
        raise InputError(f"--key-column {column}: that column holds the images, not keys (and "
                         "they carry no distinct file names): pick another column")  # fmt: skip
    keys = ["" if v is None else str(v) for v in values or []]
    seen: set[str] = set()
    for row, key in enumerate(keys):
        if not key:
            raise InputError(f"dataset {name}: row {row} has no value in key column {column!r}: "
                             "pick another with --key-column")  # fmt: skip
        if key in seen:
            raise InputError(f"dataset {name}: key {key!r} appears twice in column {column!r}: "
                             "keys must be unique; pick another with --key-column")  # fmt: skip
        seen.add(key)
    return keys


def _class_names(features: Any, kept: list[str], taken: set[str]) -> dict[str, str]:
    """ClassLabel columns -> the column of their class names (label -> label_class)."""
    import datasets

    out = {}
    for column in kept:
        if isinstance(features[column], datasets.ClassLabel):
            new = f"{column}_class"
            if new not in taken and new not in FIXED_COLUMNS:
                out[column] = new
    return out


def _class_name(feature: Any, value: Any) -> str | None:
    try:
        return None if value is None or value < 0 else str(feature.int2str(int(value)))
    except (ValueError, IndexError):
        return None


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
