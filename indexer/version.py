"""The package version: one place, read by the CLI, the manifest and the export cache."""

__version__ = "0.1.0"
