"""Exceptions for expected failures: bad input, missing files, invalid recipes.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class G3nError(Exception):
    """An expected failure whose message already says what went wrong and what to do."""


class ConfigError(G3nError, ValueError):
    """A model config that is not a valid Gemma 3n config."""


class CheckpointError(G3nError):
    """A checkpoint that cannot be found, read or trusted."""


class RecipeError(G3nError, ValueError):
    """A size or target recipe that is invalid for the chosen model."""


class OutputError(G3nError):
    """An output folder that cannot be written."""
