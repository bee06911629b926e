"""indexer: turn image collections into searchable embedding indexes."""

__version__ = "0.1.0"
