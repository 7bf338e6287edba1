"""Output for a person: straight to the streams, so Ray Train's print patch does not echo it twice."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """One status line on stdout, flushed at once so `ray job logs` shows it live."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """One warning line on stderr."""
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()
