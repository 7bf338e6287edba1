"""Guards against the tutorial's two warned failures: unstable training and mode collapse.

Each guard looks at what the loop already measures and returns a `Verdict` (what went wrong and
what to do) or None. The thresholds were chosen by measurement (see the README's "Quality"): a
healthy run of the tutorial recipe stays clear of both.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

SATURATION = 0.99  # D wins outright: D(x) above this and D(G(z)) below 1 - this
DIVERGENCE_PATIENCE = 2  # epochs in a row of a saturated D before it counts as divergence
COLLAPSE_RATIO = 0.5  # coverage below this fraction of the run's recent best ...
COLLAPSE_PATIENCE = 2  # ... for this many evaluations in a row counts as mode collapse
COLLAPSE_WINDOW = 5  # evaluations that make up "recent"
MAX_ROLLBACKS = 3  # after this many rollbacks a run stops instead of looping


@dataclass(frozen=True)
class Verdict:
    guard: str  # "divergence" or "collapse"
    cause: str  # one sentence for a person and for metrics.jsonl
    action: str  # "warn", "rollback" or "stop"


class DivergenceGuard:
    """A non-finite loss, or D saturated for `patience` epochs in a row."""

    def __init__(self, action: str, patience: int = DIVERGENCE_PATIENCE) -> None:
        self.action = action
        self.patience = patience
        self.saturated_epochs = 0

    @property
    def suspicious(self) -> bool:
        """A failure may be starting: a rollback should not return to this state."""
        return self.saturated_epochs > 0

    def check(self, row: dict) -> Verdict | None:
        losses = (row["loss_d"], row["loss_g"])
        if not all(math.isfinite(v) for v in losses):
            self.saturated_epochs = 0
            return Verdict("divergence", f"non-finite loss at epoch {row['epoch']} (loss_d {losses[0]}, loss_g {losses[1]})", self.action)
        saturated = row["d_real_prob"] > SATURATION and row["d_fake_prob"] < 1 - SATURATION
        self.saturated_epochs = self.saturated_epochs + 1 if saturated else 0
        if self.saturated_epochs >= self.patience:
            self.saturated_epochs = 0
            return Verdict(
                "divergence",
                f"D saturated for {self.patience} epochs up to epoch {row['epoch']} "
                f"(D(x) {row['d_real_prob']:.4f}, D(G(z)) {row['d_fake_prob']:.4f})",
                self.action,
            )
        return None

    def forget(self) -> None:
        """After a rollback, the saturated epochs belong to epochs that are being trained again."""
        self.saturated_epochs = 0


class CollapseGuard:
    """Class coverage far below the run's own recent level for `patience` evaluations."""

    def __init__(self, action: str, ratio: float = COLLAPSE_RATIO, patience: int = COLLAPSE_PATIENCE, window: int = COLLAPSE_WINDOW) -> None:
        self.action = action
        self.ratio = ratio
        self.patience = patience
        self.recent: deque[float] = deque(maxlen=window)
        self.low_evaluations = 0

    @property
    def suspicious(self) -> bool:
        """A failure may be starting: a rollback should not return to this state."""
        return self.low_evaluations > 0

    def check(self, epoch: int, modes_covered: float) -> Verdict | None:
        best = max(self.recent, default=None)
        self.recent.append(modes_covered)
        if best is None or modes_covered >= self.ratio * best:
            self.low_evaluations = 0
            return None
        self.low_evaluations += 1
        if self.low_evaluations < self.patience:
            return None
        self.low_evaluations = 0
        return Verdict(
            "collapse",
            f"class coverage {modes_covered:g} at epoch {epoch} is below {self.ratio:g} x the recent best {best:g} "
            f"for {self.patience} evaluations",
            self.action,
        )

    def forget(self) -> None:
        """After a rollback, the history belongs to epochs that are being trained again."""
        self.recent.clear()
        self.low_evaluations = 0
