"""Pick a source implementation from a SOURCE argument, or from a manifest's source entry."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from indexer.config import DEFAULT_MAX_PIXELS, SourceSpec, StorageOptions
from indexer.errors import InputError
from indexer.sources.base import HF_PREFIX, Item, Source

__all__ = [
    "HF_PREFIX",
    "Item",
    "Source",
    "list_items",
    "open_source",
    "open_sources",
    "source_spec",
]


def open_source(
    spec: SourceSpec,
    label: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    listed: dict[str, Any] | None = None,
) -> Source:
    """Open one source; heavy libraries are imported only for the kind that needs them.
    Image files are read up to what an image of max_pixels can need, regular files only.
    `listed`: an object-store prefix's listing, made already (by the early start)."""
    from indexer.sources.bucket import is_bucket_url

    if is_bucket_url(spec.location.removeprefix(HF_PREFIX)):
        return open_bucket(spec, label, max_pixels, listed)
    if "://" in spec.location and not Path(spec.location).exists():
        raise InputError(
            f"{spec.location} is a URL: a build reads URLs from a list, so write it (and any "
            "others) into a file, one a line (urls.txt; or a CSV, JSONL or Parquet file with a "
            "url column), and build that file; buckets are s3://, gs:// or az:// prefixes"
        )
    from indexer.sources.url_list import is_url_list

    if is_url_list(spec.location):
        from indexer.sources.bucket import parse_options
        from indexer.sources.url_list import UrlListSource

        options = parse_options(spec.storage_options)
        return UrlListSource(Path(spec.location).expanduser(), label, max_pixels,
                             spec.url_column, spec.key_column, options,
                             spec.read_concurrency, spec.refetch,
                             spec.read_retries)  # fmt: skip
    if spec.location.startswith(HF_PREFIX):
        from indexer.sources.hf import HFSource

        name = spec.location[len(HF_PREFIX) :]
        return HFSource(name, spec.split, spec.image_column, label, max_pixels, spec.key_column)
    from indexer.sources.folder import FolderSource
    from indexer.sources.wds import WebDatasetSource, is_webdataset

    root = Path(spec.location).expanduser()
    if is_webdataset(root):  # .tar shards (img2dataset --output_format webdataset)
        return WebDatasetSource(root, label, max_pixels)
    if is_parquet_dataset(root):  # Parquet files (img2dataset --output_format parquet)
        from indexer.sources.hf import HFSource

        return HFSource(str(root), spec.split, spec.image_column, label, max_pixels,
                        spec.key_column)  # fmt: skip
    return FolderSource(root, label, spec.follow_symlinks, max_pixels)


def is_parquet_dataset(root: Path) -> bool:
    """A folder of .parquet files (and their stats, a licence, hidden files): no subfolders
    and no image files at its top level."""
    from indexer.sources.folder import is_image_name

    if not root.is_dir():
        return False
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    plain = not any(p.is_dir() or is_image_name(p.name) for p in entries)
    return plain and any(p.suffix.lower() == ".parquet" and p.is_file() for p in entries)


def open_sources(
    specs: tuple[SourceSpec, ...],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    listings: Mapping[str, dict[str, Any]] | None = None,
) -> list[Source]:
    """Open every source, giving each a unique label (keys are prefixed by it when several);
    `listings`: object-store prefixes' listings made already, by the SOURCE given."""
    listings = listings or {}
    sources = [open_source(spec, None, max_pixels, listings.get(spec.location))
               for spec in specs]  # fmt: skip
    labels = unique_labels([src.label for src in sources])
    for src, label in zip(sources, labels, strict=True):
        src.label = label
    return sources


def unique_labels(names: list[str]) -> list[str]:
    """Each name kept where it is the first of its kind; a repeat becomes NAME-N with the
    smallest N >= 2 that is no source's own name nor taken (a/pics, b/pics, c/pics-2 ->
    pics, pics-3, pics-2), so no two sources share a label and no key is shared."""
    natural, taken, labels = set(names), set(), []
    for name in names:
        label, n = name, 2
        while label in taken or (label != name and label in natural):
            label, n = f"{name}-{n}", n + 1
        taken.add(label)
        labels.append(label)
    return labels


def list_items(sources: list[Source]) -> list[Item]:
    """Every item of every source in order; keys carry the source label when there are several."""
    prefixed = len(sources) > 1
    items: list[Item] = []
    for i, src in enumerate(sources):
        for key, locator, fingerprint in src.keys_and_locators():
            items.append(Item(f"{src.label}/{key}" if prefixed else key, i, locator, fingerprint))
    return items


def source_spec(source: dict[str, Any], storage_options: StorageOptions = ()) -> SourceSpec:
    """The SOURCE argument a manifest's source entry was built from, with the storage
    options given now (never stored: they may hold secrets)."""
    if source["kind"] == "hf":  # (Parquet files in a bucket: read with today's options)
        return SourceSpec(f"hf:{source['name']}", source["split"], source["image_column"],
                          key_column=source.get("key_column"),
                          storage_options=storage_options)  # fmt: skip
    if source["kind"] == "urllist":
        return SourceSpec(source["path"], key_column=source.get("key_column"),
                          url_column=source.get("url_column") or "url",
                          storage_options=storage_options)  # fmt: skip
    return SourceSpec(source["path"], follow_symlinks=bool(source.get("follow_symlinks")),
                      storage_options=storage_options)  # fmt: skip


def open_bucket(
    spec: SourceSpec, label: str | None, max_pixels: int, listed: dict[str, Any] | None = None
) -> Any:
    """The source a prefix holds, told from its listing (`listed`, else listed now) as for a
    folder: Parquet files alone (img2dataset's parquet output, a Parquet dataset) are a
    dataset, .tar files alone (webdataset shards) are samples, anything else is images."""
    from indexer.sources.bucket import bucket_of

    bucket = bucket_of(spec, max_pixels, label, listed)
    kind, files = bucket.holds()
    if kind == "parquet":  # (datasets' own cache of remote files is not keyed by ETag:
        from indexer.sources.hf import HFSource  # an overwritten file would be read stale)

        staged = tuple(str(path) for path in bucket.stage(files))
        return HFSource(bucket.written, spec.split, spec.image_column, label, max_pixels,
                        spec.key_column, staged)  # fmt: skip
    if kind == "tars" and not spec.location.startswith(HF_PREFIX):
        from indexer.sources.bucket_tars import BucketTars, BucketWebDatasetSource

        return BucketWebDatasetSource(BucketTars(bucket, files), label, max_pixels)
    if spec.location.startswith(HF_PREFIX):
        raise InputError(f"{spec.location}: the prefix holds no Parquet files alone (a "
                         "dataset): give it without hf: to index its images")  # fmt: skip
    return bucket
