"""Typed errors: IndexerError and the few subclasses the CLI maps to exit codes."""

from __future__ import annotations


class IndexerError(Exception):
    """Base of every error the library raises on purpose; its message says what to do."""


class InputError(IndexerError):
    """A source, flag or file given by the user cannot be used as given."""


class ModelError(IndexerError):
    """The model or its weights cannot be created or loaded."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights cannot be fetched (offline hub, unknown tag)."""


class CollectionError(IndexerError):
    """A collection directory is missing, incomplete or corrupt."""


class CollectionLockedError(IndexerError):
    """Another run holds the collection's lock; try again later."""


class TooManyFailuresError(IndexerError):
    """More items failed than the failure budget allows."""


class RecipeMismatchError(CollectionError):
    """The embedding recipe recorded in a collection cannot be reproduced here."""


class ModelMismatchError(CollectionError):
    """The collection's stored model does not reproduce its stored vectors (another model)."""


class StorageError(IndexerError):
    """Writing failed on the storage's side (disk full, quota, I/O error); nothing was published."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived: unwind like Ctrl-C (locks released, the run recorded), then exit 143."""
