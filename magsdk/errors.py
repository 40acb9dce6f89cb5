"""Error types. Each message says what was wrong, the value, and what to do next."""

from __future__ import annotations


class MagSDKError(Exception):
    """Base class for errors magsdk raises on purpose (the CLI prints them without a traceback)."""

    exit_code = 1


class UsageError(MagSDKError):
    """The user asked for something that cannot work as given (CLI exit code 2)."""

    exit_code = 2


class StrategyNotFoundError(UsageError):
    """No strategy is registered for a transformer class."""


class BlockLayoutError(MagSDKError):
    """A block's inputs or outputs do not match the metadata the cache was given."""
