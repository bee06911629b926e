"""The service's browsing: items paged in id order, and the text column shown under them."""

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

    schema = collection.schema()
    if schema is None:
        return None
    for name in TEXT_COLUMNS:
        if name in schema.names:
            kind = schema.field(name).type
            if pa.types.is_string(kind) or pa.types.is_large_string(kind):
                return name
    return None
