"""What a sweep found: each trial's status and FID, the winner re-scored with `evaluate`'s protocol, `results.csv`,
`sweep.png`, the closing table, PBT's exploits, and the winner's promotion (`--promote-to`)."""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import re
import sys
from dataclasses import dataclass, field

from gan.plots import sweep_png
from job.commands.evaluate import evaluate_state, prepare_evaluator, store_in_run
from job.commands.train import Promotion, promote_finished_run
from job.config import TrainConfig
from job.storage.artifacts import RunArtifacts
from job.storage.checkpoint import load_from, read_checkpoint
from job.storage.location import Location, resolve_location
from job.storage.checkpoint_schema import checkpoint_digest
from job.sweep.space import Dimension
from job.sweep.trial import SEGMENT_FILE, TRIAL_EPOCH, TrialPlan

RESULTS_FILE = "results.csv"
FIGURE_FILE = "sweep.png"
RESCORED = 3  # the best finished trials by training FID that the final evaluation re-scores
FINAL_EVAL_SEED = 0  # evaluate's and promote's default: the winner's eval.json is the one promote reuses
FID = "quality/fid_classifier"
TRIAL_ID = re.compile(r"([0-9a-f]{5}_\d{5})")


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
        return int(self.trial.rsplit("_", 1)[-1]) if self.trial.rsplit("_", 1)[-1].isdigit() else 0

    @property
    def final_fid(self) -> float | None:
        return self.final["fid_classifier"] if self.final else None


def trial_outcomes(results, plan: TrialPlan, dimensions: list[Dimension]) -> list[TrialOutcome]:  # ray ResultGrid
    target = int(plan.base["epochs"])
    time_attr = TRIAL_EPOCH if plan.scheduler == "pbt" else "epoch"
    outcomes = []
    for result in results:
        metrics = result.metrics or {}
        found = TRIAL_ID.search(str(metrics.get("trial_id") or posixpath.basename(result.path.rstrip("/"))))
        trial = found.group(1) if found else posixpath.basename(result.path)
        params = {d.name: (result.config or {}).get(d.name) for d in dimensions}
        epochs = int(metrics.get(time_attr) or 0)
        if result.error is not None:
            status = "failed"
        elif metrics.get("stopped"):
            status = "stopped by a guard"
        elif epochs >= target:
            status = "finished"
        else:
            status = f"stopped by {plan.scheduler} at epoch {epochs}"
        run = metrics.get("run") or (trial if plan.scheduler != "pbt" else None)
        runs = continued_runs(plan, trial) if plan.scheduler == "pbt" else [run]
        curve = recorded_curve(plan, runs)
        if plan.scheduler != "pbt" and curve:
            # A stopped trial's run may finish the epoch it was in while Tune's stop travels: count what it recorded.
            epochs = curve[-1][0]
        quality = metrics.get("quality") if isinstance(metrics.get("quality"), dict) else {}
        fid = quality.get("fid_classifier", metrics.get(FID))
        fid = float(fid) if isinstance(fid, (int, float)) and math.isfinite(fid) else None
        outcomes.append(TrialOutcome(trial, params, status, epochs, run, fid, quality, curve, runs))
    return sorted(outcomes, key=lambda o: o.index)


def continued_runs(plan: TrialPlan, trial: str) -> list[str]:
    """A PBT trial's runs as its storage holds them: its first, then `<trial>.<k>` after each exploit, in the
    order of k. Not from Tune's results: a trial restarted by an exploit may lose its earlier reports there."""
    names = resolve_location(plan.runs, plan.base.get("s3_endpoint")).list_names(folders_only=True)
    after = {int(name.rsplit(".", 1)[1]): name for name in names
             if name.startswith(trial + ".") and name.rsplit(".", 1)[1].isdigit()}  # fmt: skip
    return [trial, *(after[k] for k in sorted(after))]


def recorded_curve(plan: TrialPlan, runs: list[str]) -> list[tuple[int, float]]:
    """(the trial's epoch, FID) of every epoch its runs recorded; a run `<trial>.<k>` starts at the trial's epoch k."""
    points = {}
    for name in runs:
        offset = int(name.rsplit(".", 1)[1]) if "." in name else 0
        for row in RunArtifacts(plan.run_location(name)).read_metrics():
            fid = (row.get("quality") or {}).get("fid_classifier")
            if isinstance(fid, (int, float)) and math.isfinite(fid):
                points[offset + int(row["epoch"])] = float(fid)
    return sorted(points.items())


def rescore(outcomes: list[TrialOutcome], plan: TrialPlan, config: TrainConfig, num: int) -> TrialOutcome | None:
    """Evaluate the best RESCORED finished trials as `evaluate --num num` does, each into its run's eval.json;
    the winner: the lowest FID, ties to more modes, then to the lower trial index."""
    finished = [o for o in outcomes if o.status == "finished" and o.fid is not None and o.run]
    shortlist = sorted(finished, key=lambda o: (o.fid, o.index))[:RESCORED]
    if not shortlist:
        return None
    evaluator = prepare_evaluator(config.data, config.data_dir, config.s3_endpoint)
    for outcome in shortlist:
        run = plan.run_location(outcome.run)
        checkpoint, state = load_from(run.uri, config.s3_endpoint)
        print(f"final evaluation of trial {outcome.trial} ({num} images, seed {FINAL_EVAL_SEED})", flush=True)
        outcome.final = evaluate_state(evaluator, state, checkpoint.uri, config.data, num, FINAL_EVAL_SEED)
        store_in_run(run, outcome.final, evaluator)
    return min(shortlist, key=lambda o: (o.final_fid, -o.final.get("modes_covered", 0), o.index))


def results_csv(outcomes: list[TrialOutcome], dimensions: list[Dimension]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "run", *(d.name for d in dimensions), "status", "epochs", "fid_train", "fid_final",
                     "modes", "precision", "recall"])  # fmt: skip
    for o in outcomes:
        measured = o.final or o.quality
        writer.writerow([o.trial, o.run or "", *(_number(o.params[d.name], 6) for d in dimensions), o.status, o.epochs,
                         _number(o.fid), _number(o.final_fid), measured.get("modes_covered", ""),
                         _number(measured.get("precision")), _number(measured.get("recall"))])  # fmt: skip
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


def exploits(outcomes: list[TrialOutcome], plan: TrialPlan, s3_endpoint: str | None) -> list[dict]:
    """PBT's exploits, read back from the runs: each run that a trial started from another's checkpoint, with the
    donor, the trial's epoch there, and the digests of the donor's checkpoint and of the run's first state."""
    found = []
    for outcome in outcomes:
        for run_name in outcome.runs[1:] if plan.scheduler == "pbt" else []:
            rows = RunArtifacts(plan.run_location(run_name)).read_metrics()
            started = rows[0].get("init_from") if rows else None
            if not started:
                continue
            source = resolve_location(started["uri"], s3_endpoint)
            segment = source.child(SEGMENT_FILE)
            donor = json.loads(segment.read_text()) if segment.exists() else {}
            found.append({
                "trial": outcome.trial,
                "run": run_name,
                "donor": donor.get("trial"),
                "donor_run": donor.get("run"),
                "epoch": donor.get(TRIAL_EPOCH),
                "donor_digest": checkpoint_digest(read_checkpoint(source)),
                "first_state_digest": started.get("parameter_digest"),
                "source": started["uri"],
            })  # fmt: skip
    return found


def conclude(results, args, dimensions: list[Dimension], plan: TrialPlan, sweep: Location, config: TrainConfig,
             promotion: Promotion | None) -> int:  # fmt: skip
    """Rank, re-score, write and print what the sweep found; promote the winner when asked."""
    outcomes = trial_outcomes(results, plan, dimensions)
    winner = rescore(outcomes, plan, config, args.final_eval_num)
    sweep.child(RESULTS_FILE).write_text(results_csv(outcomes, dimensions))
    final = {o.trial: (o.final_fid if o.final_fid is not None else o.fid) for o in outcomes}
    sweep.child(FIGURE_FILE).write_bytes(sweep_png(
        {o.trial: o.curve for o in outcomes},
        winner.trial if winner else None,
        {d.name: {o.trial: o.params[d.name] for o in outcomes} for d in dimensions},
        {trial: fid for trial, fid in final.items() if fid is not None},
        log_scaled=[d.name for d in dimensions if d.kind == "log"],
    ))  # fmt: skip
    print(closing_table(outcomes, dimensions, winner), flush=True)
    for taken in exploits(outcomes, plan, config.s3_endpoint):
        print(f"exploit: trial {taken['trial']} took trial {taken['donor']}'s weights at epoch {taken['epoch']} "
              f"(run {taken['run']}: donor digest {taken['donor_digest']}, its first state "
              f"{taken['first_state_digest']})", flush=True)  # fmt: skip
    print(f"sweep {args.sweep}: {RESULTS_FILE} and {FIGURE_FILE} in {sweep.uri}", flush=True)
    if winner is None:
        print(f"gan-job: sweep {args.sweep} has no finished trial to choose; see {sweep.child(RESULTS_FILE).uri}",
              file=sys.stderr)  # fmt: skip
        return 1
    params = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in winner.params.items())
    print(f"best: trial {winner.trial} ({params}): FID {winner.final_fid} on {args.final_eval_num} images; run "
          f"{plan.run_location(winner.run).uri}", flush=True)  # fmt: skip
    if promotion is None:
        return 0
    return promote_finished_run(plan.run_location(winner.run), promotion,
                                plan.config_for(winner.params, winner.run), sweep=args.sweep,
                                num=args.final_eval_num)  # fmt: skip
