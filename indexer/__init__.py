"""indexer: turn image collections into searchable embedding indexes."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``from indexer import Collection`` without importing numpy or FAISS for ``--help``."""
    if name == "Collection":
        from indexer.query.collection import Collection

        return Collection
    raise AttributeError(f"module 'indexer' has no attribute {name!r}")
