"""The promotion gate: point a job's `LATEST` at a finished run when its quality is no worse than the current one's.

A finished run is promoted when its `fid_classifier` is no worse than LATEST's by the margin; LATEST and
`promotions.jsonl` are written by compare-and-swap. `promote_run` is the one way in, for `gan-job promote`,
`train --promote-to` and `tune --promote-to` alike. Why: docs/architecture.md#promotion-by-compare-and-swap
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import traceback
import uuid
from dataclasses import dataclass

from gan.data import DataError
from gan.metrics import QualityEvaluator
from job.console import warn
from job.errors import UsageError
from job.promotion.evaluation import DEFAULT_NUM, DEFAULT_SEED, evaluate_state, prepare_evaluator, protocol_of
from job.promotion.evaluation import run_evaluation, same_protocol
from job.settings import EVAL_NUM, MAX_MARGIN, SEED, Setting
from job.storage.checkpoint import STATE_FILE, load_from
from job.storage.checkpoint_schema import checkpoint_num_classes
from job.storage.location import Location, resolve_location
from job.storage.pointer import LOG_FILE, PreconditionFailed, Snapshot, Store, append, check_enforced, is_under
from job.storage.pointer import read_pointer, read_snapshot, replace_pointer, storage_root
from job.storage.s3_preflight import check_readable

POINTER_NAME = "LATEST"  # the one name a pointer has: <storage>/<job>/LATEST
MAX_DECISIONS = 5  # reads and decisions before giving up on a LATEST that other promotions keep moving
# Exit status when training finished but its promotion (`--promote-to`) failed: 0 is success (the promotion made
# or declined), 1 a failed run, 2 bad input; 3 is free everywhere in the CLI.
PROMOTION_FAILED = 3
# -1 would promote a run infinitely worse; above MAX_MARGIN every run passes anyway.
MARGIN = Setting(
    "promote when fid_new <= fid_current * (1 + margin); 0 = no worse, 0.05 = up to 5 % worse, "
    "-0.1 = at least 10 % better",
    kind=float,
    low=-1,
    low_open=True,
    high=MAX_MARGIN,
)


# The promotion flags of `train` and `tune`: never environment knobs (cli.NOT_FROM_ENVIRONMENT).
PROMOTE_TO = Setting(
    "after training finished, promote the run to this pointer as `promote` does with its defaults; "
    "exit status 3 if the promotion fails (no environment variable)",
    env=False,
    metavar="<storage>/<job>/LATEST",
)
PROMOTE_MARGIN = dataclasses.replace(  # promote's --margin, its bounds included
    MARGIN,
    help="with --promote-to: promote's --margin (default 0: no worse than the current LATEST; no environment variable)",
    env=False,
    metavar="M",
)


@dataclass(frozen=True)
class Promotion:
    """`--promote-to TARGET [--promote-margin M]`: after training, promote the run to TARGET."""

    target: str | None  # <storage>/<job>/LATEST; None only when --promote-margin came without it (refused)
    margin: float = 0.0  # promote's --margin

    def check(self, s3_endpoint: str | None) -> Location:
        """The target, after the checks that need no storage: the margin, the pointer's name, the URI."""
        check_margin(self.margin, flag="--promote-margin")
        if self.target is None:
            raise UsageError("--promote-margin needs --promote-to <storage>/<job>/LATEST; pass both, or neither")
        check_pointer_name(self.target, flag="--promote-to")
        return resolve_location(self.target, s3_endpoint, flag="--promote-to")


class RaceLost(Exception):
    """Other promotions kept moving LATEST: nothing of this one was written."""


@dataclass(frozen=True)
class Candidate:
    """What a promotion decides about: a run, its newest checkpoint, and its evaluation (None when unfinished)."""

    run: Location
    checkpoint: Location
    state: dict
    num_classes: int
    unfinished: str | None  # why it has not finished; None once it has
    evaluation: dict | None = None
    evaluator: QualityEvaluator | None = None


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_pointer_name(target: str, flag: str = "--target") -> None:
    """Refuse a target whose last part is not LATEST: `promote` and `train --promote-to` write no other pointer."""
    if target.rsplit("/", 1)[-1] != POINTER_NAME:
        raise UsageError(
            f"{flag} {target!r} does not name a pointer; pass <storage>/<job>/{POINTER_NAME}, "
            f"e.g. <storage>/gan/{POINTER_NAME}"
        )


def check_margin(margin: object, flag: str = "--margin") -> None:
    """Refuse a margin that is not a finite number in (-1, MAX_MARGIN]."""
    MARGIN.check(flag, margin)


def check_run_beside(run: Location, target: Location, flag: str = "--target") -> None:
    """Refuse a run outside the storage of the pointer it would be promoted to: a LATEST names only runs under its
    own storage root, so that a consumer of LATEST (and `evaluate --from LATEST`, which writes into the run) never
    leaves it."""
    root = storage_root(target)
    if not is_under(run, root):
        raise UsageError(
            f"{flag} {target.uri} may name only runs under {root.uri}, and run {run.uri} is not; promote it to "
            "a LATEST in its own storage, <storage>/<job>/LATEST"
        )


def check_target(target: Location, s3_endpoint: str | None, flag: str = "--target") -> None:
    """Refuse, before any work, a target that is not a LATEST pointer (nor absent), cannot be read, or whose
    store does not enforce the conditional writes that promotions rely on (a probe, written and deleted)."""
    check_pointer_name(target.uri, flag)
    check_readable(target.uri, s3_endpoint, flag)  # a wrong endpoint or credentials fail in seconds
    read_pointer(target, flag)  # a LATEST that is not a pointer is refused before any work
    check_enforced(target, s3_endpoint, flag)  # seconds, before minutes of evaluation


def finished_run(run: Location, s3_endpoint: str | None) -> Candidate:
    """The run's newest checkpoint, and why the run has not finished (None once it has: its model.json is there
    and its newest checkpoint is of its last epoch)."""
    try:
        checkpoint, state = load_from(run.uri, s3_endpoint)
    except UsageError:
        raise UsageError(
            f"--run {run.uri} holds no readable checkpoint; pass <storage>/<run-name> of a finished run"
        ) from None
    candidate = Candidate(run, checkpoint, state, checkpoint_num_classes(state), None)
    try:  # a read that fails raises: "not finished" is decided only on a model.json that is not there
        model = json.loads(run.child("artifacts", "model.json").read_text())
    except FileNotFoundError:
        return dataclasses.replace(candidate, unfinished="the run has no artifacts/model.json: it has not finished")
    except ValueError:
        reason = "the run's artifacts/model.json is not JSON: it did not finish writing it"
        return dataclasses.replace(candidate, unfinished=reason)
    epochs = model.get("epochs", state["config"].get("epochs"))
    if state["epoch"] != epochs:
        reason = f"the newest checkpoint is of epoch {state['epoch']}, the run is configured for {epochs}"
        return dataclasses.replace(candidate, unfinished=reason)
    return candidate


def model_kind(num_classes: int) -> str:
    return f"conditional ({num_classes} classes)" if num_classes else "unconditional"


def current_num_classes(current: dict, target: Location, s3_endpoint: str | None) -> int:
    """The classes LATEST's model is conditional on (0: unconditional): as LATEST records it, else as its run's
    checkpoint does."""
    if isinstance(current.get("num_classes"), int):
        return current["num_classes"]
    _checkpoint, state = current_checkpoint(
        current, target, s3_endpoint, "whose kind (conditional or not) cannot be read"
    )
    return checkpoint_num_classes(state)


def current_checkpoint(current: dict, target: Location, s3_endpoint: str | None, why: str) -> tuple[Location, dict]:
    """The newest checkpoint of the run LATEST points at; `why` says, in the refusal, what it was needed for."""
    try:
        return load_from(current["run"], s3_endpoint)
    except UsageError as err:
        raise UsageError(f"--target {target.uri} points at a run {why} ({err})") from None


def check_same_kind(current: dict | None, candidate: Candidate, target: Location, s3_endpoint: str | None) -> None:
    """Refuse a candidate of the other kind (conditional or not, or another class count) than LATEST's model."""
    if current is None:
        return
    current_classes = current_num_classes(current, target, s3_endpoint)
    if current_classes != candidate.num_classes:
        raise UsageError(
            f"--run {candidate.run.uri} is {model_kind(candidate.num_classes)}, but the model --target {target.uri} "
            f"points at is {model_kind(current_classes)} (train --conditional differs); use a target of the run's own "
            "kind, e.g. <storage>/<job>-conditional/LATEST"
        )


def current_fid_classifier(
    current: dict, target: Location, candidate: dict, evaluator: QualityEvaluator, s3_endpoint: str | None
) -> tuple[float, bool]:
    """LATEST's fid_classifier measured as the candidate's was: the stored number, or its run evaluated again.

    Returns the number and whether it had to be measured again.
    """
    stored_fid = current.get("fid_classifier")
    if same_protocol(current.get("evaluation") or {}, protocol_of(candidate)) and isinstance(stored_fid, (int, float)):
        return float(stored_fid), False
    checkpoint, state = current_checkpoint(
        current, target, s3_endpoint, "that cannot be evaluated again for comparison"
    )
    result = evaluate_state(
        evaluator, state, checkpoint.uri, candidate["data"], candidate["num_images"], candidate["seed"]
    )
    return result["fid_classifier"], True


def decided(decision: dict) -> None:
    """Called after each decision, before any of it is written: a seam where tests order overlapping promotions."""


@dataclass
class Gate:
    """One promotion's fixed terms: where LATEST is, the margin, and how LATEST's own number is measured again."""

    target: Location
    margin: float
    s3_endpoint: str | None
    sweep: str | None = None  # the sweep that chose the run, named in the decision
    measured: dict | None = None  # LATEST's runs evaluated again, by what LATEST said of them

    def decide(self, current: dict | None, candidate: Candidate) -> dict:
        """The decision about the candidate against `current` (LATEST as just read)."""
        decision = {
            "run": candidate.run.uri,
            "target": self.target.uri,
            "decided_at": now_utc(),
            "margin": self.margin,
            "epoch": int(candidate.state["epoch"]),
        }
        if self.sweep:  # chosen by `gan-job tune`
            decision["sweep"] = self.sweep
        if current is not None:
            decision["current_run"] = current["run"]
        if candidate.unfinished:
            return {**decision, "promoted": False, "reason": candidate.unfinished}
        evaluation = candidate.evaluation
        decision.update(
            fid_classifier=evaluation["fid_classifier"], fid_classifier_floor=evaluation["fid_classifier_floor"]
        )
        if current is None:
            return {**decision, "promoted": True, "reason": "no LATEST yet"}
        current_fid, reevaluated = self._current_fid(current, candidate)
        threshold = current_fid + self.margin * abs(current_fid)
        promoted = evaluation["fid_classifier"] <= threshold
        return {
            **decision,
            "current_fid_classifier": current_fid,
            "current_reevaluated": reevaluated,
            "threshold": round(threshold, 4),
            "promoted": promoted,
            "reason": f"fid_classifier {evaluation['fid_classifier']} {'<=' if promoted else '>'} "
            f"{round(threshold, 4)} (current {current_fid} with margin {self.margin})",
        }

    def _current_fid(self, current: dict, candidate: Candidate) -> tuple[float, bool]:
        """LATEST's number as the candidate's was measured, once per LATEST however often the race is rerun."""
        self.measured = self.measured if self.measured is not None else {}
        named = {name: current.get(name) for name in ("run", "source", "fid_classifier", "evaluation")}
        key = json.dumps(named, sort_keys=True)
        if key not in self.measured:
            self.measured[key] = current_fid_classifier(
                current, self.target, candidate.evaluation, candidate.evaluator, self.s3_endpoint
            )
        return self.measured[key]


def promote_run(
    run: Location,  # the run folder to promote, <storage>/<run-name>
    target: Location,  # its pointer, <storage>/<job>/LATEST
    margin: float = 0.0,  # promoted when fid_new <= fid_current + margin * |fid_current|
    data: str | None = None,  # the real data to compare with; None = the run's own
    data_dir: str | None = None,  # where that data's files are; None = the usual resolution order
    num: int = DEFAULT_NUM,  # generated images per evaluation
    seed: int = DEFAULT_SEED,  # seed of their noise
    s3_endpoint: str | None = None,  # None = AWS_ENDPOINT_URL
    sweep: str | None = None,  # the sweep that chose the run, named in the decision
) -> dict:
    """Move LATEST to `run` when it passes the gate; the decision, which is also appended to the log. Every check
    comes first; RaceLost when other promotions kept moving LATEST (nothing of this one written)."""
    check_margin(margin)
    EVAL_NUM.check("--num", num)
    SEED.check("--seed", seed)
    check_pointer_name(target.uri)
    check_readable(run.uri, s3_endpoint, "--run")
    if data_dir:
        check_readable(data_dir, s3_endpoint, "--data-dir")
    if not run.exists():
        raise UsageError(f"--run {run.uri} does not exist; pass <storage>/<run-name> of a finished run")
    if run.child(STATE_FILE).exists():
        raise UsageError(f"--run {run.uri} is a checkpoint folder; pass its run folder, <storage>/<run-name>")
    check_run_beside(run, target)
    check_target(target, s3_endpoint)
    candidate = finished_run(run, s3_endpoint)
    store = Store(s3_endpoint)
    check_same_kind(read_snapshot(store, target).pointer, candidate, target, s3_endpoint)  # before the evaluation
    if not candidate.unfinished:  # measured once; each decision compares it with the LATEST of its read
        chosen = data or candidate.state["config"]["data"]
        evaluator = prepare_evaluator(chosen, data_dir, s3_endpoint, candidate.state)
        evaluation = run_evaluation(run, candidate.checkpoint, candidate.state, evaluator, chosen, num, seed)
        candidate = dataclasses.replace(candidate, evaluation=evaluation, evaluator=evaluator)
    decision = compare_and_swap(store, Gate(target, margin, s3_endpoint, sweep), candidate)
    if decision["promoted"]:
        log_promotion(store, target, decision)
    return decision


def compare_and_swap(store: Store, gate: Gate, candidate: Candidate) -> dict:
    """Decide against LATEST as read, and write the decision only if LATEST and the log are still as read; else read
    again and decide again (a write whose reply was lost but that landed is found by its id)."""
    decision_id = uuid.uuid4().hex
    for attempt in range(1, MAX_DECISIONS + 1):
        snapshot = read_snapshot(store, gate.target)
        mine = snapshot.find(decision_id)
        if mine is not None:  # a write whose reply was lost had landed
            return mine
        check_same_kind(snapshot.pointer, candidate, gate.target, gate.s3_endpoint)  # LATEST may have moved since
        decision = {**gate.decide(snapshot.pointer, candidate), "id": decision_id, "attempt": attempt}
        if (snapshot.carried or {}).get("id"):
            decision["current_decision"] = snapshot.carried["id"]
        decided(decision)
        try:
            write_decision(store, gate.target, snapshot, decision, candidate)
        except PreconditionFailed:
            continue  # another promotion wrote first: read again and decide against what it wrote
        return decision
    raise RaceLost(
        f"promote lost the race for {gate.target.uri} {MAX_DECISIONS} times (other promotions kept moving it); "
        "nothing of this one was written; run it again"
    )


def write_decision(store: Store, target: Location, snapshot: Snapshot, decision: dict, candidate: Candidate) -> None:
    """A promotion replaces LATEST (which carries its decision); a refusal is appended to the log."""
    if not decision["promoted"]:
        append(store, target, snapshot, decision)
        return
    evaluation = candidate.evaluation
    pointer = {
        "run": candidate.run.uri,
        "fid_classifier": evaluation["fid_classifier"],
        "promoted_at": decision["decided_at"],
        "epoch": evaluation["epoch"],
        "source": candidate.checkpoint.uri,
        "evaluation": protocol_of(evaluation),
        "decision": decision,
        "conditional": bool(candidate.num_classes),
        "num_classes": candidate.num_classes,
    }
    replace_pointer(store, target, snapshot, pointer)


def log_promotion(store: Store, target: Location, decision: dict) -> None:
    """Append a promotion that LATEST already carries to the log, unless another promotion did so meanwhile."""
    for _ in range(MAX_DECISIONS):
        snapshot = read_snapshot(store, target)
        if snapshot.logged(decision["id"]) is not None:
            return
        try:
            append(store, target, snapshot, decision)
            return
        except PreconditionFailed:
            continue
    warn(
        f"the promotion is in {target.uri} but not yet in its {LOG_FILE}: other promotions kept writing it; "
        "the next one logs it"
    )


def promote_after_training(
    run: Location,  # the finished run
    run_name: str,  # its name, for the lines printed
    target: Location,  # <storage>/<job>/LATEST
    margin: float,  # promote's --margin
    data_dir: str | None,  # where the run's data is (its IDX files), as it trained
    s3_endpoint: str | None,
    sweep: str | None = None,  # the sweep that chose the run
    num: int | None = None,  # generated images of the evaluation (the sweep's final one's); None: promote's default
) -> int:
    """`train --promote-to` and `tune --promote-to`: promote the finished run as `gan-job promote` would, print the
    decision; 0 when it was made or declined, PROMOTION_FAILED (one line saying how to retry) otherwise."""
    chosen = f" (the best of sweep {sweep})" if sweep else ""
    print(f"promoting run {run_name}{chosen} to {target.uri} if it is no worse than the current one", flush=True)
    try:
        num = DEFAULT_NUM if num is None else num
        decision = promote_run(run, target, margin, None, data_dir, num, DEFAULT_SEED, s3_endpoint, sweep)
    except (UsageError, DataError, OSError, RaceLost) as err:
        reason = " ".join(str(err).split())
    except Exception as err:  # noqa: BLE001 (the run is done: say so, with the trace, and exit 3, not 1)
        traceback.print_exc()
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
    else:
        print(json.dumps(decision, sort_keys=True), flush=True)
        return 0
    print(
        f"gan-job: run {run_name} finished, but promoting it to {target.uri} failed (exit status "
        f"{PROMOTION_FAILED}): {reason}; the run is complete, retry with `gan-job promote --run {run.uri} "
        f"--target {target.uri}`",
        file=sys.stderr,
        flush=True,
    )
    return PROMOTION_FAILED
