"""`python -m job` and the `gan-job` console script.

The signal handlers come first: the imports after them take seconds (torch), and a Ctrl-C during them ends the
command as one at any later point does, with one line and exit status 130 (`job.runtime.interrupts`).
"""

import sys

from job.runtime.interrupts import Interrupted, install_interrupt_handlers

install_interrupt_handlers()
try:
    from job.cli import main
except Interrupted as stop:
    print("gan-job: interrupted", file=sys.stderr, flush=True)
    sys.exit(stop.status)


def main_entry() -> None:
    """The `gan-job` console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
