"""The sweep's Ray Tune: a new Tuner over the space, or the sweep's own restored once its state is known to be
sealed by this project (`job.storage.signed_filesystem`); the trial drivers' resource; PBT that exploits.
Why: docs/tune.md
"""

from __future__ import annotations

from job.errors import UsageError
from job.storage.checkpoint import DIGEST_FILE, STATE_FILE
from job.storage.location import Location
from job.storage.signed_filesystem import check_signed, signed_filesystem
from job.storage.signing import SIGNING_KEY_ENV, SignatureError
from job.sweep.space import Dimension, to_mutation, to_tune
from job.sweep.spec import SweepArgs
from job.sweep.trial import SEGMENT_FILE, TRIAL_DRIVER_RESOURCE, TRIAL_EPOCH, TrialPlan, run_trial

METRIC = "quality/fid_classifier"  # Tune flattens each report's `quality` dict
TUNE_FOLDER = "tune"  # Tune's experiment in <storage>/<sweep>/
RUNS_FOLDER = "runs"
LOCAL_DRIVER_SLOTS = 8  # trial drivers the local cluster of `gan-job tune` holds (each takes no CPU)
KEEP_TUNE_CHECKPOINTS = 3  # PBT hands out a trial's latest; older ones stay for a donor being read (ray#8441)
# Files in Tune's folder that the project reads itself and never unpickles: a PBT checkpoint's state (loaded
# weights-only, checked against its digest) and its segment record (JSON). Everything else Tune wrote is sealed.
PLAIN_FILES = (STATE_FILE, DIGEST_FILE, SEGMENT_FILE)


def check_tune_state(args: SweepArgs, sweep: Location) -> None:
    """Refuse, before any Ray work, a sweep whose Tune folder holds a file this project did not seal: Tune would
    unpickle it on the resume (or on a new sweep's restore)."""
    try:
        check_signed(sweep.child(TUNE_FOLDER), PLAIN_FILES)
    except SignatureError as err:
        raise UsageError(
            f"--sweep {args.sweep}: {err}, and Ray Tune would unpickle it to resume the sweep, so it is not resumed; "
            f"if the sweep was started with another key, set {SIGNING_KEY_ENV} to that key, else move "
            f"{sweep.child(TUNE_FOLDER).uri} away to start Tune's state afresh (the trials' runs are kept)"
        ) from None


def check_driver_resource() -> None:
    """Refuse a cluster where no node declares the trial drivers' resource (the sweep would wait forever)."""
    import ray

    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) < 1:
        raise UsageError(
            f"the Ray cluster has no {TRIAL_DRIVER_RESOURCE!r} resource for the sweep's trial drivers (a driver must "
            f"not take a worker's CPU); declare it on the head: rayStartParams.resources: "
            f'\'"{{\\"{TRIAL_DRIVER_RESOURCE}\\": {LOCAL_DRIVER_SLOTS}}}"\' (KubeRay) or '
            f"`ray start --head --resources '{{\"{TRIAL_DRIVER_RESOURCE}\": {LOCAL_DRIVER_SLOTS}}}'`"
        )


def exploit_before_the_end():  # -> a PopulationBasedTraining subclass (Ray imported once the input is checked)
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    class ExploitBeforeTheEnd(PopulationBasedTraining):
        """PBT that leaves a trial's last report alone: an exploit after the last epoch would train nothing, and
        would restart the trial only to end it."""

        def __init__(self, last_epoch: int, **kwargs: object) -> None:
            super().__init__(**kwargs)
            self.last_epoch = last_epoch

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if result.get(TRIAL_EPOCH, 0) >= self.last_epoch:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return ExploitBeforeTheEnd


def scheduler_for(args: SweepArgs, dimensions: list[Dimension], epochs: int):  # -> a ray.tune scheduler
    """ASHA on the epoch, PBT on the trial's epoch (exploiting before the last), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if args.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=2)
    if args.scheduler == "pbt":
        return exploit_before_the_end()(
            epochs,
            time_attr=TRIAL_EPOCH,
            perturbation_interval=args.perturbation_interval,
            hyperparam_mutations={d.name: to_mutation(d) for d in dimensions},
            synch=True,  # every trial is compared at each segment's end: exploits do not hang on who came first
        )
    return FIFOScheduler()


def build_tuner(args: SweepArgs, dimensions: list[Dimension], plan: TrialPlan, sweep: Location):  # -> ray.tune.Tuner
    """A new Tuner for the sweep, or the sweep's own restored when it was started before (`check_tune_state` has
    checked its state)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan), tune.PlacementGroupFactory([{"CPU": 0, TRIAL_DRIVER_RESOURCE: 1}])
    )
    filesystem = signed_filesystem(sweep, plan.base.get("s3_endpoint"), PLAIN_FILES)  # Tune reads what it sealed
    path = sweep.child(TUNE_FOLDER).path
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        print(
            f"resuming sweep {args.sweep}: finished trials are kept, unfinished ones go on from their checkpoints; "
            "Ray does not restore the scheduler's state (ASHA's rungs, PBT's population; ray#30838): it starts "
            "afresh with the trials' next results",
            flush=True,
        )
        return tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    return tune.Tuner(
        trainable,
        param_space={d.name: to_tune(d) for d in dimensions},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            num_samples=args.trials,
            scheduler=scheduler_for(args, dimensions, int(plan.base["epochs"])),
            # The generator throttles (Tune ignores max_concurrent_trials beside a search algorithm of its own).
            search_alg=BasicVariantGenerator(random_state=int(plan.base["seed"]), max_concurrent=args.max_concurrent),
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER,
            storage_path=sweep.path,
            storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_TUNE_CHECKPOINTS),
            verbose=1,
        ),
    )
