"""indexer: turn image collections into searchable embedding indexes."""

from indexer.version import __version__

__all__ = ["Collection", "__version__"]


def __getattr__(name: str) -> object:
    """``from indexer import Collection`` without importing numpy or FAISS for ``--help``."""
    if name == "Collection":
        from indexer.query.collection import Collection

        return Collection
    raise AttributeError(f"module 'indexer' has no attribute {name!r}")
