"""Ctrl-C (SIGINT) and SIGTERM, as a terminal and Kubernetes send them: the command stops at once with its own
exit status (128 + the signal), one line, and no process of the cluster it started left behind.

Ray installs handlers of its own: `ray.init` one for SIGTERM (exit status 15), Ray Train's and Tune's `fit` one
for SIGINT (a graceful abort that ends in exit status 1, and may leave the run's controller running). So this
project's handlers are installed again once Ray is connected, and `fit` runs in a thread of its own, where Ray
installs none.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
HANDLED = (signal.SIGINT, signal.SIGTERM)
JOIN_INTERVAL_S = 0.2  # how often the waiting main thread wakes: a signal is handled between two waits


class Interrupted(BaseException):
    """A signal that ends the command; a BaseException, so that no `except Exception` on the way takes it for
    an error to report or retry."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def status(self) -> int:
        """The exit status a shell gives a command that a signal ended: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


_deferred: list[int] = []  # signals that came while `deferred_interrupts` held them
_holding = False  # whether `deferred_interrupts` is holding them now


def _raise_interrupted(signum: int, _frame: object) -> None:
    if _holding:
        _deferred.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs (`ray.init`, whose C++ core aborts the process when an
    exception is raised in the middle of it), then raise `Interrupted` for the first that came, if any: so a Ctrl-C
    while the cluster starts ends as one at any other point, once the cluster can be stopped."""
    global _holding
    _holding, held = True, _holding
    try:
        yield
    finally:
        _holding = held
        if _deferred and not held:
            signum = _deferred[0]
            _deferred.clear()
            raise Interrupted(signum)


def install_interrupt_handlers() -> None:
    """Make SIGINT and SIGTERM raise `Interrupted` in the main thread (elsewhere Python allows no handler)."""
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, _raise_interrupted)


def in_own_thread(work: Callable[[], T], name: str) -> T:
    """`work()` (a Ray `fit`) run in a thread of its own while the main thread waits, so that the signal handlers
    above stay in force; its result, or its exception raised again here."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:  # noqa: BLE001 (handed to the main thread, raised there)
            outcome["error"] = err

    thread = threading.Thread(target=run, name=name, daemon=True)  # daemon: an interrupt does not wait for it
    thread.start()
    while thread.is_alive():
        thread.join(JOIN_INTERVAL_S)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
