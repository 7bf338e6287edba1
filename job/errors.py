"""The errors that end the program with one line and exit status 2 (bad input, never a bug)."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: a flag, a file or a resource. The message names it and says how to fix it."""


def flag_name(field: str) -> str:
    """The command-line flag for a config field: `batch_size` → `--batch-size`."""
    return "--" + field.replace("_", "-")
