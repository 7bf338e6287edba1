"""Guards against the tutorial's two warned failures: unstable training and mode collapse.

Each guard looks at what the loop already measures and returns a `Verdict` (what went wrong and
what to do) or None. The thresholds were chosen by measurement (see the README's "Quality"): a
healthy run of the tutorial recipe stays clear of both. `Guards` holds the policy around them:
the loop asks it once per epoch what now (go on, warn, roll back or stop), and it keeps the books
of rollbacks (how many, what the next metrics row says about one, what is forgotten after one).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from job.runtime.distributed import print0

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
            return Verdict(
                "divergence",
                f"non-finite loss at epoch {row['epoch']} (loss_d {losses[0]}, loss_g {losses[1]})",
                self.action,
            )
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

    def __init__(
        self,
        action: str,
        ratio: float = COLLAPSE_RATIO,
        patience: int = COLLAPSE_PATIENCE,
        window: int = COLLAPSE_WINDOW,
    ) -> None:
        self.action = action
        self.ratio = ratio
        self.patience = patience
        self.recent: deque[float] = deque(maxlen=window)
        self.low_evaluations = 0

    @property
    def suspicious(self) -> bool:
        """A failure may be starting: a rollback should not return to this state."""
        return self.low_evaluations > 0

    def check(self, epoch: int, coverage: float, measure: str = "class coverage") -> Verdict | None:
        """`coverage`: the classes the generated images cover (labelled data), or their recall (unlabelled data,
        which has no classes: recall falls as a generator stops covering the real images)."""
        best = max(self.recent, default=None)
        self.recent.append(coverage)
        if best is None or coverage >= self.ratio * best:
            self.low_evaluations = 0
            return None
        self.low_evaluations += 1
        if self.low_evaluations < self.patience:
            return None
        self.low_evaluations = 0
        return Verdict(
            "collapse",
            f"{measure} {coverage:g} at epoch {epoch} is below {self.ratio:g} x the recent best {best:g} "
            f"for {self.patience} evaluations",
            self.action,
        )

    def forget(self) -> None:
        """After a rollback, the history belongs to epochs that are being trained again."""
        self.recent.clear()
        self.low_evaluations = 0


class Guards:
    """Both guards and what is done about their verdicts, including the escalation to stop."""

    def __init__(self, on_divergence: str, on_collapse: str, max_rollbacks: int = MAX_ROLLBACKS) -> None:
        self.divergence = DivergenceGuard(on_divergence)
        self.collapse = CollapseGuard(on_collapse)
        self.max_rollbacks = max_rollbacks
        self.rollbacks = 0  # rollbacks so far in this attempt
        self.verdict: Verdict | None = None  # the latest epoch's, after escalation
        self._judged_epoch = 0
        self._note: dict | None = None  # what the next metrics row says about a rollback before it

    @property
    def trusted(self) -> bool:
        """Whether the latest epoch is a state to roll back to: no verdict and no doubts."""
        return self.verdict is None and not (self.divergence.suspicious or self.collapse.suspicious)

    def judge(self, row: dict, stats: dict[str, float]) -> Verdict | None:
        """What now after the epoch of `row` (`stats`: its unrounded means): None, or warn, rollback or stop.

        Notes in `row` what it found (`guard`, `stopped`) and the rollback before it (`after_rollback`).
        """
        if self._note:
            row["after_rollback"], self._note = self._note, None
        verdicts = [self.divergence.check({**row, **stats})]
        if "quality" in row:
            quality = row["quality"]
            if quality.get("modes_covered") is not None:
                verdicts.append(self.collapse.check(row["epoch"], quality["modes_covered"]))
            else:
                verdicts.append(self.collapse.check(row["epoch"], quality["recall"], "recall"))
        verdict = next((v for v in verdicts if v is not None), None)
        if verdict:
            row["guard"] = {"guard": verdict.guard, "cause": verdict.cause, "action": verdict.action}
            print0(f"guard: {verdict.cause}; action: {verdict.action}")
            if verdict.action == "rollback" and self.rollbacks >= self.max_rollbacks:
                verdict = Verdict(verdict.guard, f"{verdict.cause}, after {self.max_rollbacks} rollbacks", "stop")
                row["guard"]["action"] = "stop"
            if verdict.action == "rollback":
                self.rollbacks += 1
            if verdict.action == "stop":
                row["stopped"] = verdict.cause
        self.verdict, self._judged_epoch = verdict, row["epoch"]
        return verdict

    def rolled_back(self, to_epoch: int) -> None:
        """The state went back to `to_epoch`: forget what the guards saw since, and say why in the next row."""
        self.divergence.forget()
        self.collapse.forget()
        self._note = {
            "cause": self.verdict.cause,
            "diverged_at_epoch": self._judged_epoch,
            "resumed_from_epoch": to_epoch,
        }
