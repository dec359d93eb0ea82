"""Errors a user can act on. The CLI prints these without a traceback; anything else is a bug
and keeps its traceback. Kept free of heavy imports so every command can catch them cheaply."""


class CkaflowError(Exception):
    """Base class: the message says what was expected, what was found, and how to fix it."""


class ConfigError(CkaflowError, ValueError):
    """A study configuration that does not match the schema."""


class DatasetError(CkaflowError, RuntimeError):
    """A data set that is missing or not what it should be."""


class StoreError(CkaflowError, RuntimeError):
    """An activation or statistics store that is missing, incomplete or not what it claims."""


class ComparisonError(CkaflowError, ValueError):
    """Two sides that cannot be compared (different examples, order or blocks)."""


class CheckpointError(CkaflowError, RuntimeError):
    """A checkpoint that cannot be read or belongs to another run."""


class TableError(CkaflowError, ValueError):
    """CKA tables that cannot be merged (missing, from an older schema, overlapping)."""


class UnsafeFileError(CheckpointError):
    """A file whose unpickling would build arbitrary Python objects (and so could run code):
    refused, never loaded; not mere damage, so no stage silently replaces it."""
