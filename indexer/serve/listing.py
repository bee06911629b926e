"""The service's browsing: items paged in id order, a collection's text column and weights."""

from __future__ import annotations

from typing import Any

from indexer.query.collection import Collection

MAX_LIMIT = 200  # items one page may ask for; beyond: 422
DEFAULT_LIMIT = 60
TEXT_COLUMNS = ("caption", "text", "title", "alt", "description")  # shown under a picture


def item_page(
    collection: Collection, offset: int, limit: int, where: list[str] | None
) -> tuple[int, list[dict[str, Any]]]:
    """How many items `where` keeps (all without it), and the stored rows (no vectors) of
    `limit` of them from `offset`, in id order: the query path's rows, never a shard read."""
    ids = collection.allowed_ids(where or [])  # no condition: every id, sorted
    rows = []
    for item_id in ids[offset : offset + limit].tolist():
        row = collection.row_of(int(item_id))
        if row is not None:
            rows.append(row)
    return len(ids), rows


def text_column(collection: Collection) -> str | None:
    """The first of TEXT_COLUMNS the collection's rows hold as text, or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = collection.paths.shard_paths(collection.manifest)
    if not paths:
        return None
    schema = pq.read_schema(paths[0])  # the footer only: which columns, of what type
    for name in TEXT_COLUMNS:
        if name in schema.names:
            kind = schema.field(name).type
            if pa.types.is_string(kind) or pa.types.is_large_string(kind):
                return name
    return None


def weights_kind(manifest: dict[str, Any]) -> str | None:
    """How the model's weights were made ('pretrained', 'random', ...); None without a model."""
    weights = (manifest.get("model") or {}).get("weights")
    kind = weights.get("kind") if isinstance(weights, dict) else weights
    return str(kind) if kind is not None else None
