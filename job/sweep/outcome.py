"""What a sweep found: each trial's status and FID, the winner re-scored with `evaluate`'s protocol, `results.csv`,
`sweep.png`, the closing table, PBT's exploits, and the winner's promotion (`--promote-to`).

Each trial is read from Tune's own result (its id, its searched values, its error, its last report); what its runs
recorded is read from storage, in one place (`recorded`), which says why.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import sys
from dataclasses import dataclass, field

from job.errors import UsageError
from job.promotion.evaluation import DEFAULT_SEED, evaluate_state, prepare_evaluator, store_in_run
from job.promotion.gate import promote_after_training
from job.storage.artifacts import RunArtifacts
from job.storage.checkpoint import load_from, read_checkpoint
from job.storage.checkpoint_schema import checkpoint_digest
from job.storage.location import Location, resolve_location
from job.sweep.figure import sweep_png
from job.sweep.space import Dimension
from job.sweep.spec import SweepArgs
from job.sweep.trial import SEGMENT_FILE, TRIAL_EPOCH, TrialPlan

RESULTS_FILE = "results.csv"
FIGURE_FILE = "sweep.png"
RESCORED = 3  # the best finished trials by training FID that the final evaluation re-scores
FID = "quality/fid_classifier"
COLUMNS = ("status", "epochs", "fid_train", "fid_final", "modes", "precision", "recall")


@dataclass
class TrialOutcome:
    """One trial as the sweep ends."""

    trial: str
    params: dict
    status: str  # finished / stopped by asha at epoch k / stopped by a guard / failed
    epochs: int  # the epochs its runs recorded (a stopped trial's may include the one it was in when stopped)
    run: str | None  # its last run's name, under <sweep>/runs/
    fid: float | None  # the training FID of its last epoch
    quality: dict = field(default_factory=dict)  # its last training evaluation
    curve: list[tuple[int, float]] = field(default_factory=list)  # (the trial's epoch, FID) as its runs recorded
    runs: list[str] = field(default_factory=list)  # every run it trained in, in order (pbt: after each exploit)
    final: dict | None = None  # the final evaluation (the best three finished only)

    @property
    def index(self) -> int:
        """Its place in Tune's order: the number after the last underscore of its id."""
        number = self.trial.rsplit("_", 1)[-1]
        return int(number) if number.isdigit() else 0

    @property
    def final_fid(self) -> float | None:
        return self.final["fid_classifier"] if self.final else None


def trial_id_of(result) -> str:  # result: ray.tune.Result
    """The trial's id from Tune's own report; a trial that failed before its first report has none, and is named
    by its folder, which Tune names `<trainable>_<trial id>_<values>`."""
    reported = (result.metrics or {}).get("trial_id")
    if reported:
        return str(reported)
    parts = posixpath.basename(result.path.rstrip("/")).split("_")
    return "_".join(parts[2:4]) if len(parts) >= 4 else posixpath.basename(result.path)


def trial_outcome(result, plan: TrialPlan, dimensions: list[Dimension]) -> TrialOutcome:  # result: ray.tune.Result
    """One trial from Tune's result, and the epochs and FIDs its runs recorded."""
    metrics = result.metrics or {}
    trial = trial_id_of(result)
    pbt = plan.scheduler == "pbt"
    run = metrics.get("run") or (None if pbt else trial)  # a PBT trial's reports name the run they came from
    runs, curve = recorded(plan, trial, run)
    epochs = int(metrics.get(TRIAL_EPOCH if pbt else "epoch") or 0)
    if not pbt and curve:
        epochs = curve[-1][0]  # a stopped trial's run may finish the epoch it was in: what it recorded counts
    if result.error is not None:
        status = "failed"
    elif metrics.get("stopped"):
        status = "stopped by a guard"
    elif epochs >= int(plan.base["epochs"]):
        status = "finished"
    else:
        status = f"stopped by {plan.scheduler} at epoch {epochs}"
    quality = metrics.get("quality") if isinstance(metrics.get("quality"), dict) else {}
    fid = quality.get("fid_classifier", metrics.get(FID))
    fid = float(fid) if isinstance(fid, (int, float)) and math.isfinite(fid) else None
    params = {d.name: (result.config or {}).get(d.name) for d in dimensions}
    return TrialOutcome(trial, params, status, epochs, run, fid, quality, curve, runs)


def recorded(plan: TrialPlan, trial: str, run: str | None) -> tuple[list[str], list[tuple[int, float]]]:
    """A trial's runs and (the trial's epoch, FID) of every epoch they recorded, read from their own records in
    storage, not from Tune's results, for two reasons: a trial that Tune stops may finish the epoch it was in while
    the stop travels, and its run records it; and the results of a PBT trial restarted by an exploit can lack its
    earlier reports. A PBT trial's runs are its first, then `<trial>.<k>` (from the trial's epoch k) after each
    exploit, in the order of k."""
    if plan.scheduler != "pbt":
        runs = [run or trial]
    else:
        names = plan.runs.list_names(folders_only=True)
        after = {}
        for name in names:
            stem, _, epoch = name.rpartition(".")
            if stem == trial and epoch.isdigit():
                after[int(epoch)] = name
        runs = [trial, *(after[k] for k in sorted(after))]
    points = {}
    for name in runs:
        offset = int(name.rsplit(".", 1)[1]) if "." in name else 0
        for row in RunArtifacts(plan.runs.child(name)).read_metrics():
            fid = (row.get("quality") or {}).get("fid_classifier")
            if isinstance(fid, (int, float)) and math.isfinite(fid):
                points[offset + int(row["epoch"])] = float(fid)
    return runs, sorted(points.items())


def rescore(outcomes: list[TrialOutcome], plan: TrialPlan, num: int) -> TrialOutcome | None:
    """Evaluate the best RESCORED finished trials as `evaluate --num num` does, each into its run's eval.json;
    the winner: the lowest FID, ties to more modes, then to the lower trial index."""
    finished = [o for o in outcomes if o.status == "finished" and o.fid is not None and o.run]
    shortlist = sorted(finished, key=lambda o: (o.fid, o.index))[:RESCORED]
    if not shortlist:
        return None
    data, endpoint = plan.base["data"], plan.base.get("s3_endpoint")
    evaluator = None
    for outcome in shortlist:
        run = plan.runs.child(outcome.run)
        checkpoint, state = load_from(run.uri, endpoint)
        evaluator = evaluator or prepare_evaluator(data, plan.base.get("data_dir"), endpoint, state)
        print(f"final evaluation of trial {outcome.trial} ({num} images, seed {DEFAULT_SEED})", flush=True)
        outcome.final = evaluate_state(evaluator, state, checkpoint.uri, data, num, DEFAULT_SEED)
        store_in_run(run, outcome.final, evaluator)
    return min(shortlist, key=lambda o: (o.final_fid, -o.final.get("modes_covered", 0), o.index))


def results_csv(outcomes: list[TrialOutcome], dimensions: list[Dimension]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "run", *(d.name for d in dimensions), *COLUMNS])
    for o in outcomes:
        measured = o.final or o.quality
        searched = [_number(o.params[d.name], 6) for d in dimensions]
        scores = [_number(o.fid), _number(o.final_fid), measured.get("modes_covered", "")]
        recall = [_number(measured.get("precision")), _number(measured.get("recall"))]
        writer.writerow([o.trial, o.run or "", *searched, o.status, o.epochs, *scores, *recall])
    return buffer.getvalue()


def _number(value: object, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def closing_table(outcomes: list[TrialOutcome], dimensions: list[Dimension], winner: TrialOutcome | None) -> str:
    """results.csv as aligned columns, the winner marked."""
    rows = list(csv.reader(io.StringIO(results_csv(outcomes, dimensions))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        mark = "*" if winner is not None and row[0] == winner.trial else " "
        lines.append(mark + " " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


def exploits(outcomes: list[TrialOutcome], plan: TrialPlan) -> list[dict]:
    """PBT's exploits, read back from the runs: each run that a trial started from another's checkpoint, with the
    donor, the trial's epoch there, and the digests of the donor's checkpoint and of the run's first state."""
    found = []
    for outcome in outcomes:
        for run_name in outcome.runs[1:] if plan.scheduler == "pbt" else []:
            rows = RunArtifacts(plan.runs.child(run_name)).read_metrics()
            started = rows[0].get("init_from") if rows else None
            if not started:
                continue
            source = resolve_location(started["uri"], plan.base.get("s3_endpoint"))
            segment = source.child(SEGMENT_FILE)
            donor = json.loads(segment.read_text()) if segment.exists() else {}
            if not isinstance(donor, dict):
                raise UsageError(f"{segment.uri} is not a segment record this version writes; fix or move it")
            found.append(
                {
                    "trial": outcome.trial,
                    "run": run_name,
                    "donor": donor.get("trial"),
                    "donor_run": donor.get("run"),
                    "epoch": donor.get(TRIAL_EPOCH),
                    "donor_digest": checkpoint_digest(read_checkpoint(source)),
                    "first_state_digest": started.get("parameter_digest"),
                    "source": started["uri"],
                }
            )
    return found


def write_figure(sweep: Location, outcomes: list[TrialOutcome], dims: list[Dimension], winner: TrialOutcome | None):
    """`sweep.png`: each trial's curve, its FID against each searched setting, the best against the trials."""
    final = {o.trial: (o.final_fid if o.final_fid is not None else o.fid) for o in outcomes}
    picture = sweep_png(
        {o.trial: o.curve for o in outcomes},
        winner.trial if winner else None,
        {d.name: {o.trial: o.params[d.name] for o in outcomes} for d in dims},
        {trial: fid for trial, fid in final.items() if fid is not None},
        log_scaled=[d.name for d in dims if d.kind == "log"],
    )
    sweep.child(FIGURE_FILE).write_bytes(picture)


def conclude(
    results,  # ray.tune.ResultGrid
    args: SweepArgs,
    dims: list[Dimension],
    plan: TrialPlan,
    sweep: Location,
    promotion: tuple[Location, float] | None,  # --promote-to's pointer and --promote-margin; None: no promotion
) -> int:
    """Rank, re-score, write and print what the sweep found; promote the winner when asked."""
    outcomes = sorted((trial_outcome(result, plan, dims) for result in results), key=lambda o: o.index)
    winner = rescore(outcomes, plan, args.final_eval_num)
    sweep.child(RESULTS_FILE).write_text(results_csv(outcomes, dims))
    write_figure(sweep, outcomes, dims, winner)
    print(closing_table(outcomes, dims, winner), flush=True)
    for taken in exploits(outcomes, plan):
        print(
            f"exploit: trial {taken['trial']} took trial {taken['donor']}'s weights at epoch {taken['epoch']} "
            f"(run {taken['run']}: donor digest {taken['donor_digest']}, its first state "
            f"{taken['first_state_digest']})",
            flush=True,
        )
    print(f"sweep {args.sweep}: {RESULTS_FILE} and {FIGURE_FILE} in {sweep.uri}", flush=True)
    if winner is None:
        print(
            f"gan-job: sweep {args.sweep} has no finished trial to choose; see {sweep.child(RESULTS_FILE).uri}",
            file=sys.stderr,
        )
        return 1
    params = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in winner.params.items())
    run = plan.runs.child(winner.run)
    scored = f"FID {winner.final_fid} on {args.final_eval_num} images"
    print(f"best: trial {winner.trial} ({params}): {scored}; run {run.uri}", flush=True)
    if promotion is None:
        return 0
    target, margin = promotion
    endpoint, data_dir = plan.base.get("s3_endpoint"), plan.base.get("data_dir")
    return promote_after_training(run, winner.run, target, margin, data_dir, endpoint, args.sweep, args.final_eval_num)
