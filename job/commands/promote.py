"""The `promote` command: point a job's `LATEST` at a run when it passed its quality gate.

A finished run is promoted when its `fid_classifier` is no worse than LATEST's by `--margin`; LATEST and
`promotions.jsonl` are written by compare-and-swap. Why: docs/architecture.md#promotion-by-compare-and-swap
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import uuid

from gan.metrics import QualityEvaluator
from job.commands.evaluate import (
    EVAL_FILE,
    add_evaluation_flags,
    check_evaluation_flags,
    evaluate_state,
    prepare_evaluator,
    same_protocol,
    store_in_run,
)
from job.console import warn
from job.errors import UsageError
from job.storage.checkpoint_schema import checkpoint_num_classes
from job.settings import MAX_MARGIN, Setting, add_flag
from job.storage.checkpoint import STATE_FILE, load_from
from job.storage.location import Location, resolve_location
from job.storage.s3_preflight import check_readable
from job.storage.pointer import (
    LOG_FILE,
    PreconditionFailed,
    Snapshot,
    Store,
    append,
    check_enforced,
    is_under,
    read_pointer,
    read_snapshot,
    storage_root,
)
from job.storage.pointer import replace_pointer

POINTER_KEYS = ("run", "fid_classifier", "promoted_at")
POINTER_NAME = "LATEST"  # the one name a pointer has: <storage>/<job>/LATEST
MAX_DECISIONS = 5  # reads and decisions before giving up on a LATEST that other promotions keep moving
# -1 would promote a run infinitely worse; above MAX_MARGIN every run passes anyway.
MARGIN = Setting(
    "promote when fid_new <= fid_current * (1 + margin); 0 = no worse, 0.05 = up to 5 % worse, "
    "-0.1 = at least 10 % better",
    kind=float,
    low=-1,
    low_open=True,
    high=MAX_MARGIN,
)


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `gan-job promote` (cli.py builds the subparser and calls this)."""
    parser.add_argument("--run", required=True, help="the run folder to promote: <storage>/<run-name> (local or s3://)")
    parser.add_argument(
        "--target", required=True, help="the pointer to update: <storage>/<job>/LATEST (local or s3://)"
    )
    add_flag(parser, "--margin", MARGIN, 0.0)
    add_evaluation_flags(parser)
    parser.set_defaults(handler=promote)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def finished_state(run: Location, s3_endpoint: str | None) -> tuple[Location, dict, dict | None, str | None]:
    """The newest checkpoint (folder, state), model.json (None before the end), and why the run is unfinished
    (None if it is not)."""
    try:
        checkpoint, state = load_from(run.uri, s3_endpoint)
    except UsageError:
        raise UsageError(
            f"--run {run.uri} holds no readable checkpoint; pass <storage>/<run-name> of a finished run"
        ) from None
    try:  # a read that fails raises: "not finished" is decided only on a model.json that is not there
        model = json.loads(run.child("artifacts", "model.json").read_text())
    except FileNotFoundError:
        return checkpoint, state, None, "the run has no artifacts/model.json: it has not finished"
    except ValueError:
        return checkpoint, state, None, "the run's artifacts/model.json is not JSON: it did not finish writing it"
    epochs = model.get("epochs", state["config"].get("epochs"))
    if state["epoch"] != epochs:
        return (
            checkpoint,
            state,
            model,
            f"the newest checkpoint is of epoch {state['epoch']}, the run is configured for {epochs}",
        )
    return checkpoint, state, model, None


def protocol_of(result: dict) -> dict:
    """The fields of an evaluation that decide whether its numbers compare with another's."""
    return {name: result.get(name) for name in ("data", "num_images", "seed", "reference")}


def candidate_evaluation(
    run: Location, checkpoint: Location, state: dict, evaluator: QualityEvaluator, data: str, num: int, seed: int
) -> dict:
    """The run's stored `eval.json` when it measured this checkpoint alike, else a fresh evaluation (then stored)."""
    wanted = {"data": data, "num_images": num, "seed": seed, "reference": evaluator.describe()}
    try:  # a read that fails raises, rather than evaluating again and writing over the stored result
        stored = json.loads(run.child("artifacts", EVAL_FILE).read_text())
    except (FileNotFoundError, ValueError):
        stored = None
    if isinstance(stored, dict) and stored.get("source") == checkpoint.uri and same_protocol(stored, wanted):
        return stored
    result = evaluate_state(evaluator, state, checkpoint.uri, data, num, seed)
    store_in_run(run, result, evaluator)
    return result


def current_fid_classifier(
    current: dict, target: Location, candidate: dict, evaluator: QualityEvaluator, s3_endpoint: str | None
) -> tuple[float, bool]:
    """LATEST's fid_classifier measured as the candidate's was: the stored number, or its run evaluated again.

    Returns the number and whether it had to be measured again.
    """
    stored_fid = current.get("fid_classifier")
    if same_protocol(current.get("evaluation") or {}, protocol_of(candidate)) and isinstance(stored_fid, (int, float)):
        return float(stored_fid), False
    try:
        checkpoint, state = load_from(current["run"], s3_endpoint)
    except UsageError as err:
        raise UsageError(
            f"--target {target.uri} points at a run that cannot be evaluated again for comparison ({err})"
        ) from None
    result = evaluate_state(
        evaluator, state, checkpoint.uri, candidate["data"], candidate["num_images"], candidate["seed"]
    )
    return result["fid_classifier"], True


def model_kind(num_classes: int) -> str:
    return f"conditional ({num_classes} classes)" if num_classes else "unconditional"


def current_num_classes(current: dict, target: Location, s3_endpoint: str | None) -> int:
    """The classes LATEST's model is conditional on (0: unconditional): as LATEST records it, else as its run's
    checkpoint does."""
    if isinstance(current.get("num_classes"), int):
        return current["num_classes"]
    try:
        _checkpoint, state = load_from(current["run"], s3_endpoint)
    except UsageError as err:
        raise UsageError(
            f"--target {target.uri} points at a run whose kind (conditional or not) cannot be read ({err})"
        ) from None
    return checkpoint_num_classes(state)


def check_same_kind(
    current: dict | None, num_classes: int, run: Location, target: Location, s3_endpoint: str | None
) -> None:
    """Refuse a candidate of the other kind (conditional or not, or another class count) than LATEST's model."""
    if current is None:
        return
    current_classes = current_num_classes(current, target, s3_endpoint)
    if current_classes != num_classes:
        raise UsageError(
            f"--run {run.uri} is {model_kind(num_classes)}, but the model --target {target.uri} points at is "
            f"{model_kind(current_classes)} (train --conditional differs); use a target of the run's own kind, "
            "e.g. <storage>/<job>-conditional/LATEST"
        )


def decided(decision: dict) -> None:
    """Called after each decision, before any of it is written: a seam where tests order overlapping promotions."""


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


def promotion_args(
    run: str, target: str, margin: float = 0.0, data_dir: str | None = None, s3_endpoint: str | None = None
) -> argparse.Namespace:
    """The arguments of `gan-job promote --run RUN --target TARGET --margin M`, every other flag at its default
    (the run's data, the default image count and seed); `data_dir` names where the run's IDX files are."""
    parser = argparse.ArgumentParser(add_help=False)
    add_promote_arguments(parser)
    args = parser.parse_args(["--run", run, "--target", target])
    args.margin, args.data_dir, args.s3_endpoint = margin, data_dir, s3_endpoint
    return args


def promote(args: argparse.Namespace) -> int:
    """`gan-job promote`: move LATEST to `--run` when it passes the gate; print and log the decision."""
    # Check the input before anything is evaluated or written.
    check_margin(args.margin)
    check_evaluation_flags(args.data, args.num, args.seed)
    run = resolve_location(args.run, args.s3_endpoint, flag="--run")
    target = resolve_location(args.target, args.s3_endpoint, flag="--target")
    check_pointer_name(target.uri)
    check_readable(run.uri, args.s3_endpoint, "--run")
    if args.data_dir:
        check_readable(args.data_dir, args.s3_endpoint, "--data-dir")
    if not run.exists():
        raise UsageError(f"--run {args.run} does not exist; pass <storage>/<run-name> of a finished run")
    if run.child(STATE_FILE).exists():
        raise UsageError(f"--run {args.run} is a checkpoint folder; pass its run folder, <storage>/<run-name>")
    check_run_beside(run, target)
    check_target(target, args.s3_endpoint)
    checkpoint, state, model, unfinished = finished_state(run, args.s3_endpoint)
    store, num_classes = Store(args.s3_endpoint), checkpoint_num_classes(state)
    check_same_kind(
        read_or_refuse(store, target).pointer, num_classes, run, target, args.s3_endpoint
    )  # before minutes of evaluation

    # Measure the candidate once; each decision below compares it with the LATEST of its read.
    evaluator, candidate = None, None
    if not unfinished:
        data = args.data or model.get("config", {}).get("data") or state["config"]["data"]
        evaluator = prepare_evaluator(data, args.data_dir, args.s3_endpoint)
        candidate = candidate_evaluation(run, checkpoint, state, evaluator, data, args.num, args.seed)

    decision_id, measured = uuid.uuid4().hex, {}
    for attempt in range(1, MAX_DECISIONS + 1):
        snapshot = read_or_refuse(store, target)
        mine = snapshot.find(decision_id)
        if mine is not None:  # a write whose reply was lost had landed
            decision = mine
            break
        check_same_kind(snapshot.pointer, num_classes, run, target, args.s3_endpoint)  # LATEST may have moved since
        decision = decide(snapshot.pointer, run, target, args, state, unfinished, candidate, evaluator, measured)
        decision.update(id=decision_id, attempt=attempt)
        if (snapshot.carried or {}).get("id"):
            decision["current_decision"] = snapshot.carried["id"]
        decided(decision)
        try:
            if decision["promoted"]:
                replace_pointer(
                    store,
                    target,
                    snapshot,
                    {
                        "run": run.uri,
                        "fid_classifier": candidate["fid_classifier"],
                        "promoted_at": decision["decided_at"],
                        "epoch": candidate["epoch"],
                        "source": checkpoint.uri,
                        "evaluation": protocol_of(candidate),
                        "decision": decision,
                        "conditional": bool(num_classes),
                        "num_classes": num_classes,
                    },
                )
            else:
                append(store, target, snapshot, decision)
        except PreconditionFailed:
            continue  # another promotion wrote first: read again and decide against what it wrote
        break
    else:
        print(
            f"gan-job: error: promote lost the race for {target.uri} {MAX_DECISIONS} times "
            "(other promotions kept moving it); nothing of this one was written; run it again",
            file=sys.stderr,
        )
        return 1
    if decision["promoted"]:
        log_promotion(store, target, decision)
    print(json.dumps(decision, sort_keys=True))
    return 0


def read_or_refuse(store: Store, target: Location) -> Snapshot:
    """The log and LATEST as read now; a read that fails raises (`job.storage.retry`), so nothing is decided on it."""
    return read_snapshot(store, target)


def decide(
    current: dict | None,
    run: Location,
    target: Location,
    args: argparse.Namespace,
    state: dict,
    unfinished: str | None,
    candidate: dict | None,
    evaluator: QualityEvaluator | None,
    measured: dict,
) -> dict:
    """The decision about the candidate against `current` (LATEST as just read); `measured` keeps re-evaluations of
    current runs."""
    decision = {
        "run": run.uri,
        "target": target.uri,
        "decided_at": now_utc(),
        "margin": args.margin,
        "epoch": int(state["epoch"]),
    }
    if getattr(args, "sweep", None):  # chosen by `gan-job tune`
        decision["sweep"] = args.sweep
    if current is not None:
        decision["current_run"] = current["run"]
    if unfinished:
        decision.update(promoted=False, reason=unfinished)
        return decision
    decision.update(fid_classifier=candidate["fid_classifier"], fid_classifier_floor=candidate["fid_classifier_floor"])
    if current is None:
        decision.update(promoted=True, reason="no LATEST yet")
        return decision
    key = json.dumps(
        {name: current.get(name) for name in ("run", "source", "fid_classifier", "evaluation")}, sort_keys=True
    )
    if key not in measured:
        measured[key] = current_fid_classifier(current, target, candidate, evaluator, args.s3_endpoint)
    current_fid, reevaluated = measured[key]
    threshold = current_fid + args.margin * abs(current_fid)
    promoted = candidate["fid_classifier"] <= threshold
    decision.update(
        current_fid_classifier=current_fid,
        current_reevaluated=reevaluated,
        threshold=round(threshold, 4),
        promoted=promoted,
        reason=f"fid_classifier {candidate['fid_classifier']} {'<=' if promoted else '>'} {round(threshold, 4)} "
        f"(current {current_fid} with margin {args.margin})",
    )
    return decision


def log_promotion(store: Store, target: Location, decision: dict) -> None:
    """Append a promotion that LATEST already carries to the log, unless another promotion did so meanwhile."""
    for _ in range(MAX_DECISIONS):
        snapshot = read_or_refuse(store, target)
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
