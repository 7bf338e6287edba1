"""One trial of a sweep: a Ray Tune function trainable that drives an ordinary gan-job run on Ray Train.

Under fifo and asha the trial is one run, `runs/<trial>`, whose every epoch Tune hears of through Ray Train's
`TuneReportCallback`. Under pbt it trains in segments of `--perturbation-interval` epochs and reports each
segment's end with a Tune checkpoint (a copy of the run's `state.pt`): the checkpoint an exploit hands to
another trial, which continues in a new run, `runs/<trial>.<k>` (k: the trial's epoch at the exploit),
warm-started from it (`train --init-from`). Why: docs/tune.md
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from job.config import TrainConfig
from job.runtime.driver import DriverRun, build_trainer, decide_start
from job.storage.checkpoint import DIGEST_FILE, STATE_FILE
from job.storage.location import Location, is_s3

# A custom resource that trial drivers, and only they, take: declared on the head, so that a driver never takes
# the CPU a worker group needs (a head with 0 CPUs would otherwise hand drivers the workers' CPUs: a deadlock).
TRIAL_DRIVER_RESOURCE = "gan_job_trial_driver"
SEGMENT_FILE = "segment.json"  # in a PBT checkpoint: whose run it is, and the trial's epoch there
TRIAL_EPOCH = "trial_epoch"  # PBT's time_attr: the trial's epochs across its runs


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep shares; the searched settings come with each trial's config."""

    base: dict  # TrainConfig.to_dict() of the sweep's base configuration, as the driver resolved it
    runs: Location  # <storage>/<sweep>/runs (in a trial's process, rebuilt there from its URI and endpoint)
    scheduler: str  # fifo, asha or pbt
    interval: int  # pbt: epochs per segment
    data: dict = field(default_factory=dict)  # per dataset the sweep trains on: the settings the driver resolved

    def config_for(self, params: dict, run_name: str, **changes: object) -> TrainConfig:
        """The trial's run configuration: the base, the trial's values, its run name under `runs`, and every
        epoch evaluated (the sweep's score)."""
        values = {**self.base, **params, "run_name": run_name, "storage": self.runs.uri, "eval_every": 1, **changes}
        return TrainConfig.from_dict({**values, **self.data.get(values["data"], {})})

    def prepared(self, config: TrainConfig) -> DriverRun:
        """One of the trial's runs as the driver starts it: resumed from its own checkpoints, else warm-started
        from its --init-from, else from scratch (`job.runtime.driver.decide_start`)."""
        run = self.runs.child(config.run_name)
        start, config = decide_start(config, run)
        return DriverRun(config, self.runs, run, start)


def run_trial(params: dict, plan: TrialPlan) -> None:
    """The function trainable (`tune.with_parameters(run_trial, plan=...)`)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if plan.scheduler == "pbt":
        run_segments(params, plan, trial_id)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    run = plan.prepared(plan.config_for(params, trial_id))
    # A failure raises: Tune records the trial as errored. A guard's stop returns: its last report says `stopped`.
    build_trainer(run, callbacks=[TuneReportCallback()]).fit()


def run_segments(params: dict, plan: TrialPlan, trial_id: str) -> None:
    """PBT: train segment by segment, reporting each end with a checkpoint; continue from the one Tune hands over."""
    from ray import tune

    target = int(plan.base["epochs"])
    handed = tune.get_checkpoint()
    origin = read_segment(handed) if handed is not None else None
    init_from = None
    if origin is None:  # a new trial
        run_name, offset, trial_epoch = trial_id, 0, 0
    elif origin["trial"] == trial_id:  # its own last report: a restored trial goes on in its run
        run_name, offset, trial_epoch = origin["run"], origin["offset"], origin[TRIAL_EPOCH]
    else:  # an exploit: the donor's weights, in a new run of this trial (`train --init-from`)
        trial_epoch = origin[TRIAL_EPOCH]
        run_name, offset, init_from = f"{trial_id}.{trial_epoch}", trial_epoch, checkpoint_uri(handed, plan)
    while trial_epoch < target:
        trial_epoch = min(trial_epoch + plan.interval, target)
        run = plan.prepared(plan.config_for(params, run_name, epochs=trial_epoch - offset, init_from=init_from))
        result = build_trainer(run).fit()
        metrics = {**(result.metrics or {}), TRIAL_EPOCH: trial_epoch, "run": run_name}
        segment = {"trial": trial_id, "run": run_name, "offset": offset, TRIAL_EPOCH: trial_epoch}
        with tempfile.TemporaryDirectory(prefix="gan-segment-") as folder:
            copy_checkpoint(run.run, result.checkpoint.path, Path(folder))
            (Path(folder) / SEGMENT_FILE).write_text(json.dumps(segment) + "\n")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        if metrics.get("stopped"):
            return  # a guard's stop ends the trial, never the sweep


def copy_checkpoint(run: Location, checkpoint_path: str, folder: Path) -> None:
    """The run's checkpoint that Ray Train registered last, `state.pt` and its digest, into a local folder."""
    source = run.child(posixpath.basename(checkpoint_path.rstrip("/")))
    for name in (STATE_FILE, DIGEST_FILE):
        (folder / name).write_bytes(source.child(name).read_bytes())


def read_segment(checkpoint) -> dict | None:  # checkpoint: ray.tune.Checkpoint
    """The segment record of a PBT checkpoint; None for a checkpoint without one."""
    with checkpoint.as_directory() as folder:
        path = Path(folder) / SEGMENT_FILE
        return json.loads(path.read_text()) if path.exists() else None


def checkpoint_uri(checkpoint, plan: TrialPlan) -> str:  # checkpoint: ray.tune.Checkpoint
    """Where a Tune checkpoint lies in the sweep's storage, as `--init-from` takes it (Tune stores in the sweep's
    storage, so a bucket's path is a key in the same bucket)."""
    return "s3://" + checkpoint.path.lstrip("/") if is_s3(plan.runs.uri) else checkpoint.path
