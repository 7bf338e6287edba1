"""The errors that end the program with one line: bad input (exit 2, never a bug),
and storage that refused or failed."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: a flag, a file or a resource. The message names it and says how to fix it."""


def flag_name(field: str) -> str:
    """The command-line flag for a config field: `batch_size` → `--batch-size`."""
    return "--" + field.replace("_", "-")


class StorageError(OSError):
    """A storage operation that did not happen: the message names the location and the error, on one line;
    `outcome` says what that left behind (reads and whole-object writes change nothing)."""

    def __init__(self, message: str, outcome: str = "nothing was changed") -> None:
        super().__init__(message)
        self.outcome = outcome

    def __str__(self) -> str:
        return str(self.args[0])


class StorageRefused(StorageError):
    """The store refused the request for a reason the user fixes (credentials, permissions, a missing bucket,
    a read-only file system): failed at once, never retried; exit status 2."""


class StorageFailed(StorageError):
    """The store failed: transient errors that outlasted the retry bounds, or a full disk; exit status 1."""


class RunFailed(Exception):
    """A run that failed past its restarts, lost its controller, was stopped by a guard, or was never placed in
    time: one line, exit status 1; its checkpoints are kept and the same command resumes it."""
