"""The `tune` command's driver: a sweep of `train` runs on Ray Tune, ranked by the classifier FID.

Everything the command can check it checks before any Ray work (the space, the data, the storage, a resumed
sweep's flags, the promotion target); then it places one trial, starts (or restores) the Tuner, re-scores the best
finished trials with `evaluate`'s protocol and writes what the sweep found. Why: docs/tune.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from importlib import metadata
from dataclasses import dataclass

from job.commands.evaluate import DEFAULT_NUM, check_evaluation_flags
from job.commands.train import (
    Promotion,
    absolute_locations,
    check_data,
    check_inputs,
    check_promotion,
    connect_ray,
    prepare_storage,
    resolve_warm_start,
)
from job.commands.promote import check_run_beside, check_target
from job.config import TrainConfig
from job.errors import UsageError
from job.runtime.interrupts import in_own_thread
from job.runtime.placement import PlacementTimeout, place
from job.settings import EVAL_NUM, MAX_EPOCHS, MAX_WORKERS, Setting
from job.storage.checkpoint import DIGEST_FILE, STATE_FILE
from job.storage.location import Location, is_s3
from job.storage.s3 import endpoint_url
from job.storage.signed_filesystem import check_signed, signed_filesystem
from job.storage.signing import SIGNING_KEY_ENV, SignatureError
from job.sweep.outcome import conclude
from job.sweep.space import Dimension, corner_values, parse_space, to_mutation, to_tune, trial_count
from job.sweep.spec import SPEC_FILE, SweepSpec, check_same, read_spec
from job.sweep.trial import SEGMENT_FILE, TRIAL_DRIVER_RESOURCE, TRIAL_EPOCH, TrialPlan, run_trial

SCHEDULERS = ("fifo", "asha", "pbt")
MAX_TRIALS = 10_000
METRIC = "quality/fid_classifier"  # Tune flattens each report's `quality` dict
TUNE_FOLDER = "tune"  # Tune's experiment in <storage>/<sweep>/
RUNS_FOLDER = "runs"
LOCAL_DRIVER_SLOTS = 8  # trial drivers the local cluster of `gan-job tune` holds (each takes no CPU)
KEEP_TUNE_CHECKPOINTS = 3  # PBT hands out a trial's latest; older ones stay for a donor being read (ray#8441)
# Files in Tune's folder that the project reads itself and never unpickles: a PBT checkpoint's state (loaded
# weights-only, checked against its digest) and its segment record (JSON). Everything else Tune wrote is sealed.
PLAIN_FILES = (STATE_FILE, DIGEST_FILE, SEGMENT_FILE)

SWEEP = Setting("the sweep's name: its folder in --storage; the same name again resumes the sweep", str, metavar="NAME")
TRIALS = Setting("Tune's num_samples: the sampled dimensions are drawn N times for each grid point", int, low=1,
                 high=MAX_TRIALS, metavar="N")  # fmt: skip
SPACE = Setting("one searched train setting, repeatable: lr=log:1e-5:1e-3, lr=uniform:1e-5:1e-3, beta1=0,0.5,0.9 "
                "(a comma list is a grid)", str, metavar="NAME=SPEC")  # fmt: skip
SCHEDULER = Setting("asha stops weak trials early on the epoch's FID; pbt exploits and mutates lr and beta1; fifo "
                    "runs every trial to the end", str, choices=SCHEDULERS)  # fmt: skip
MAX_CONCURRENT = Setting("trials that train at once (each one worker group)", int, low=1, high=MAX_WORKERS,
                         metavar="K")  # fmt: skip
PERTURBATION_INTERVAL = Setting("pbt: epochs per segment, between the chances to exploit", int, low=1,
                                high=MAX_EPOCHS, metavar="EPOCHS")  # fmt: skip
FINAL_EVAL_NUM = dataclasses.replace(
    EVAL_NUM, help="images of the final evaluation of the best three finished trials (evaluate's --num)", metavar="N"
)


@dataclass(frozen=True)
class SweepArgs:
    """The sweep's own flags (the base configuration is a TrainConfig)."""

    sweep: str
    space: list[str]
    trials: int = 1
    scheduler: str = "asha"
    max_concurrent: int = 2
    perturbation_interval: int = 1
    final_eval_num: int = DEFAULT_NUM


def check_sweep(args: SweepArgs, config: TrainConfig) -> list[Dimension]:
    """Every check of the sweep's flags that needs no storage and no Ray; the parsed space."""
    try:
        config.replace(run_name=args.sweep)  # the sweep's folder: the rules of a run's name
    except UsageError:
        raise UsageError(f"--sweep {args.sweep!r} is not a valid folder or key name; use letters, digits, '.', '_' "
                         "or '-'") from None  # fmt: skip
    dimensions = parse_space(args.space, args.scheduler)
    searched_data = next((d for d in dimensions if d.name == "data"), None)
    if searched_data is not None and config.data_dir is not None:
        raise UsageError(
            f"--space {searched_data.text!r} with --data-dir: every trial would read the same files, "
            "whatever its dataset; drop --data-dir, or search one dataset"
        )
    corner_configs(config, dimensions)
    trials = trial_count(dimensions, args.trials)
    if trials > MAX_TRIALS:
        raise UsageError(
            f"--space {' '.join(args.space)} with --trials {args.trials} makes {trials:,} trials, more than the "
            f"{MAX_TRIALS:,} a sweep runs; search fewer grid values or fewer --trials"
        )
    if args.scheduler == "pbt" and args.perturbation_interval >= config.epochs:
        raise UsageError(f"--perturbation-interval {args.perturbation_interval} leaves --epochs {config.epochs} one "
                         "segment, so PBT could never exploit; pass a smaller interval or more epochs")  # fmt: skip
    if args.scheduler != "pbt" and args.perturbation_interval != 1:
        raise UsageError("--perturbation-interval is for --scheduler pbt; drop it")
    check_evaluation_flags(None, args.final_eval_num, 0)
    return dimensions


def corner_configs(config: TrainConfig, dimensions: list[Dimension]) -> list[TrainConfig]:
    """The base configuration with each of the space's corner values (`corner_values`), each one checked as `train`
    checks its flags: a refusal names the --space it came from."""
    configs = []
    for corner in corner_values(dimensions):
        dimension = next(d for d in dimensions if d.name in corner)
        try:
            configs.append(config.replace(**corner))
        except UsageError as err:
            sampled = "" if dimension.is_grid else " (a sampled setting may take any value in its range)"
            raise UsageError(f"--space {dimension.text!r}{sampled}: {err}") from None
    return configs


def spec_of(args: SweepArgs, config: TrainConfig) -> SweepSpec:
    base = config.to_dict()
    base.pop("run_name", None)
    return SweepSpec(args.sweep, base, list(args.space), args.trials, args.scheduler, args.max_concurrent,
                     args.perturbation_interval, args.final_eval_num, package_version())  # fmt: skip


def package_version() -> str:
    try:
        return metadata.version("gan-job")
    except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH
        return "unknown"


def check_driver_resource() -> None:
    """Refuse a cluster where no node declares the trial drivers' resource (the sweep would wait forever)."""
    import ray  # why: only after every check

    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) < 1:
        raise UsageError(
            f"the Ray cluster has no {TRIAL_DRIVER_RESOURCE!r} resource for the sweep's trial drivers (a driver must "
            f"not take a worker's CPU); declare it on the head: rayStartParams.resources: "
            f'\'"{{\\"{TRIAL_DRIVER_RESOURCE}\\": {LOCAL_DRIVER_SLOTS}}}"\' (KubeRay) or '
            f"`ray start --head --resources '{{\"{TRIAL_DRIVER_RESOURCE}\": {LOCAL_DRIVER_SLOTS}}}'`"
        )


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


def exploit_before_the_end():  # -> a PopulationBasedTraining subclass (Ray imported once the input is checked)
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler  # why: Ray loads in seconds

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


def build_tuner(args: SweepArgs, dimensions: list[Dimension], plan: TrialPlan, sweep: Location, config: TrainConfig):
    """A new Tuner for the sweep, or the sweep's own restored when it was started before."""
    from ray import tune  # why: Ray takes seconds to load; only once the input is checked
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # why: as `ray` above
    from ray.tune.search import BasicVariantGenerator  # why: as above

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan), tune.PlacementGroupFactory([{"CPU": 0, TRIAL_DRIVER_RESOURCE: 1}])
    )
    filesystem = signed_filesystem(sweep, config.s3_endpoint, PLAIN_FILES)  # Tune reads back only what it sealed
    path = sweep.child(TUNE_FOLDER).path
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        print(f"resuming sweep {args.sweep}: finished trials are kept, unfinished ones go on from their checkpoints; "
              "Ray does not restore the scheduler's state (ASHA's rungs, PBT's population; ray#30838): it starts "
              "afresh with the trials' next results", flush=True)  # fmt: skip
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)  # fmt: skip
    if args.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=config.epochs, grace_period=1, reduction_factor=2)
    elif args.scheduler == "pbt":
        scheduler = exploit_before_the_end()(
            config.epochs,
            time_attr=TRIAL_EPOCH,
            perturbation_interval=args.perturbation_interval,
            hyperparam_mutations={d.name: to_mutation(d) for d in dimensions},
            synch=True,  # every trial is compared at each segment's end: exploits do not hang on who came first
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={d.name: to_tune(d) for d in dimensions},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            num_samples=args.trials,
            scheduler=scheduler,
            # The generator throttles (Tune ignores max_concurrent_trials beside a search algorithm of its own).
            search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=args.max_concurrent),
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


def run_tune(args: SweepArgs, config: TrainConfig, promotion: Promotion | None = None) -> int:
    """`gan-job tune`: 0 when the sweep ran (trials may have failed: results.csv says which), 1 when no trial
    finished, 2 on bad input, 3 when the winner's promotion failed."""
    dimensions = check_sweep(args, config)
    variants = corner_configs(config, dimensions)
    target = check_promotion(promotion, config.s3_endpoint) if promotion is not None else None
    storage = check_inputs(config)
    for data in sorted({variant.data for variant in variants} - {config.data}):
        check_data(config.replace(data=data))  # each searched dataset, as its trials will load it
    sweep = storage.child(args.sweep)
    if sweep.is_file():
        raise UsageError(f"--sweep {args.sweep}: {sweep.uri} is a file, not a sweep's folder; name another --sweep")
    spec = spec_of(args, config)
    stored = read_spec(sweep)
    if stored is not None:
        check_same(spec, stored)
    check_tune_state(args, sweep)
    if config.init_from is not None:
        config = resolve_warm_start(config, variants)  # once: every trial starts from the same checkpoint
    if target is not None:
        check_run_beside(sweep.child(RUNS_FOLDER, "trial"), target, flag="--promote-to")  # where the winner will be
        check_target(target, config.s3_endpoint, flag="--promote-to")
    config = absolute_locations(config)
    if is_s3(config.storage) or is_s3(config.data_dir):
        config = config.replace(s3_endpoint=endpoint_url(config.s3_endpoint))
    connect_ray(resources={TRIAL_DRIVER_RESOURCE: LOCAL_DRIVER_SLOTS})
    check_driver_resource()
    try:
        config = place(config)  # one trial's worker group: refuses what can never fit
    except PlacementTimeout as err:
        print(f"gan-job: {err}", file=sys.stderr)
        return 1
    prepare_storage(config)
    if stored is None:
        sweep.child(SPEC_FILE).write_text(spec.to_json())
    plan = TrialPlan(config.to_dict(), sweep.child(RUNS_FOLDER).uri, args.scheduler, args.perturbation_interval)
    print(f"sweep {args.sweep}: {args.scheduler}, {args.trials} sample(s) of {' '.join(args.space) or '(no space)'}, "
          f"{args.max_concurrent} at once, {config.epochs} epochs each; storage {sweep.uri}", flush=True)  # fmt: skip
    tuner = build_tuner(args, dimensions, plan, sweep, config)
    results = in_own_thread(tuner.fit, "gan-job-tune")  # where Tune installs no SIGINT handler of its own
    return conclude(results, args, dimensions, plan, sweep, config, promotion)


def sweep_args(args: argparse.Namespace) -> SweepArgs:
    """The sweep's flags out of the parsed command line; `train` flags a sweep sets itself are refused."""
    if args.run_name is not None:
        raise UsageError("--run-name is set by the sweep (each trial is runs/<trial>); drop it and name the --sweep")
    if args.eval_every not in (None, 1):
        raise UsageError("--eval-every is 1 in a sweep (every epoch is scored); drop it")
    return SweepArgs(
        sweep=args.sweep,
        space=list(args.space or []),
        trials=args.trials,
        scheduler=args.scheduler,
        max_concurrent=args.max_concurrent,
        perturbation_interval=args.perturbation_interval,
        final_eval_num=args.final_eval_num,
    )
