"""The `train` command's driver: checks everything it can, then hands the run to Ray Train, and with
`--promote-to` promotes the finished run as `gan-job promote` would."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Iterable

from gan.data import DataError, load_split, resolve_data_dir
from job.storage.checkpoint import latest_checkpoint_or_refuse, load_from
from job.config import TrainConfig
from job.storage.data_source import fetch_from_bucket
from job.runtime.distributed import backend_for
from job.runtime.interrupts import in_own_thread, install_interrupt_handlers
from job.runtime.local_cluster import start_local_cluster
from job.errors import StorageRefused, UsageError
from job.runtime.placement import PlacementTimeout, place
from job.storage.location import Location, is_s3, ray_filesystem, resolve_location
from job.storage.checkpoint_schema import check_resumable
from job.runtime.ray_session import train_loop_per_worker
from job.commands.promote import (
    MARGIN,
    check_margin,
    check_pointer_name,
    check_run_beside,
    check_target,
    promote,
    promotion_args,
)
from job.settings import Setting
from job.storage.s3 import endpoint_url
from job.storage.pointer import resolve_latest
from job.storage.s3_preflight import check_bucket, check_readable

# Exit status when training finished but its promotion (`--promote-to`) failed: 0 is success (the
# promotion made or declined), 1 a failed run, 2 bad input; 3 is free everywhere in the CLI.
PROMOTION_FAILED = 3
# The promotion flags: declared here, never environment knobs (cli.NOT_FROM_ENVIRONMENT).
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
    """`train --promote-to TARGET [--promote-margin M]`: after training, promote the run to TARGET."""

    target: str | None  # <storage>/<job>/LATEST; None only when --promote-margin came without it (refused)
    margin: float = 0.0  # promote's --margin


def check_promotion(promotion: Promotion, s3_endpoint: str | None) -> Location:
    """The promotion's target, after the checks that need no storage: the margin, the pointer's name, the URI."""
    check_margin(promotion.margin, flag="--promote-margin")
    if promotion.target is None:
        raise UsageError("--promote-margin needs --promote-to <storage>/<job>/LATEST; pass both, or neither")
    check_pointer_name(promotion.target, flag="--promote-to")
    return resolve_location(promotion.target, s3_endpoint, flag="--promote-to")


def promote_finished_run(
    run: Location, promotion: Promotion, config: TrainConfig, sweep: str | None = None, num: int | None = None
) -> int:
    """`gan-job promote --run <the run> --target <promotion.target> --margin M` in this process; 0 when the
    promotion was made or declined (promote prints and logs the decision), PROMOTION_FAILED otherwise. `sweep`:
    the sweep that chose the run, named in the decision; `num`: promote's --num (the sweep's final evaluation's)."""
    # promote's defaults (the run's data, the default image count and seed); the IDX files the run used.
    args = promotion_args(run.uri, promotion.target, promotion.margin, config.data_dir, config.s3_endpoint)
    args.sweep = sweep
    if num is not None:
        args.num = num
    chosen = f" (the best of sweep {sweep})" if sweep else ""
    print(
        f"promoting run {config.run_name}{chosen} to {promotion.target} if it is no worse than the current one",
        flush=True,
    )
    try:
        status = promote(args)
    except (UsageError, DataError, OSError) as err:
        reason = " ".join(str(err).split())
    except Exception as err:  # noqa: BLE001 (the run is done: say so, with the trace, and exit 3, not 1)
        traceback.print_exc()
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
    else:
        if status == 0:
            return 0
        reason = f"promote ended with exit status {status} (see above)"
    print(
        f"gan-job: run {config.run_name} finished, but promoting it to {promotion.target} failed (exit status "
        f"{PROMOTION_FAILED}): {reason}; the run is complete, retry with `gan-job promote --run {run.uri} "
        f"--target {promotion.target}`",
        file=sys.stderr,
        flush=True,
    )
    return PROMOTION_FAILED


def preflight(config: TrainConfig) -> Location:
    """Fail fast, before any worker starts: data, storage and resumability. Returns the run folder.

    Everything here only reads (the S3 check's marker object is deleted again), so that bad input
    leaves nothing behind; `prepare_storage` writes, once every check has passed.
    """
    storage = check_inputs(config)
    run = storage.child(config.run_name)
    found = latest_checkpoint_or_refuse(run, "run")
    if found is not None:
        check_resumable(config, found[1])
    return run


def check_inputs(config: TrainConfig) -> Location:
    """The data (read, never written) and the storage (reachable and writable, or creatable); returns the storage."""
    storage = resolve_location(config.storage, config.s3_endpoint)
    check_data(config)
    if is_s3(config.storage):
        check_bucket(config.storage, config.s3_endpoint, flag="--storage", create=config.create_bucket)
    else:
        check_creatable(storage.path, config.storage)
    return storage


def check_data(config: TrainConfig) -> None:
    """The training split of `config.data` is found and reads whole here (a bucket's copy is fetched into the cache,
    where local workers then find it): a damaged or wrong-shaped file fails now, not in every worker."""
    if is_s3(config.data_dir):
        check_bucket(config.data_dir, config.s3_endpoint, flag="--data-dir", write=False)
        data_folder = fetch_from_bucket(config.data_dir, config.s3_endpoint)
    else:
        data_folder = resolve_data_dir(config.data, config.data_dir)
    load_split(data_folder, "train", config.limit)


def warm_start_source(config: TrainConfig, run: Location) -> TrainConfig:
    """`config` with `--init-from` resolved to the checkpoint folder it names (a LATEST pointer to its run, a run
    to its latest checkpoint), so that every worker and every restart loads the same one, after checking that it
    fits; unset when the run has checkpoints of its own, which it resumes from instead."""
    if not config.init_from:
        return config
    if latest_checkpoint_or_refuse(run, "run") is not None:  # as the workers will find it
        print(f"note: run {config.run_name} has checkpoints of its own and resumes from them; --init-from is not used")
        return config.replace(init_from=None)
    return resolve_warm_start(config)


def resolve_warm_start(config: TrainConfig, variants: Iterable[TrainConfig] = ()) -> TrainConfig:
    """`config` with `--init-from` resolved to a checkpoint folder, once it is known to fit `config`'s model and
    each of `variants` (a sweep's configurations with the searched values)."""
    check_readable(config.init_from, config.s3_endpoint, "--init-from")
    named = resolve_latest(config.init_from, config.s3_endpoint, "--init-from")
    source, donor = load_from(named, config.s3_endpoint, flag="--init-from")
    for variant in (config, *variants):
        check_resumable(variant, donor, init_from=source.uri)
    return config.replace(init_from=source.uri)


def check_creatable(path: str, flag_value: str) -> None:
    """Refuse a local storage folder that cannot be made, without making it yet."""
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"--storage {flag_value} cannot be created or written ({existing} is not a writable folder); "
            "pass a writable folder"
        )


def prepare_storage(config: TrainConfig) -> None:
    """Create a local storage folder (a bucket needs nothing)."""
    storage = resolve_location(config.storage, config.s3_endpoint)
    if storage.is_local:
        try:
            os.makedirs(storage.path, exist_ok=True)
        except OSError as err:
            raise UsageError(
                f"--storage {config.storage} cannot be created ({err.strerror}); pass a writable folder"
            ) from None


def connect_ray(resources: dict[str, float] | None = None) -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS), or start a local one of this machine's own, listening on
    loopback only (`job.runtime.local_cluster`). `resources`: custom resources the local cluster declares (a
    sweep's trial drivers take one each); a joined cluster declares its own."""
    import ray  # lazy: Ray stays off the start-up path of every command

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING", log_to_driver=True)
    else:
        start_local_cluster(resources)
    install_interrupt_handlers()  # again: ray.init replaced the SIGTERM one with its own


def worker_failure(error: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray Train's wrappers."""
    failures = getattr(error, "worker_failures", None)
    cause = next(iter(failures.values())) if failures else getattr(error, "controller_failure", error)
    return getattr(cause, "cause", None) or cause


ERROR_LINE = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception|Failed)\w*: \S")
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


def last_error_line(error: BaseException) -> str:
    """The line of a (possibly multi-line, Ray-wrapped) error that names the exception and its message."""
    lines = [ANSI_CODE.sub("", line).strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if ERROR_LINE.match(line)]
    return (named or lines or [type(error).__name__])[-1]


def build_trainer(config: TrainConfig, callbacks: list | None = None):  # -> ray.train.torch.TorchTrainer
    """The TorchTrainer for `config`: scaling, backend, storage, checkpoint and failure policy; `callbacks` are Ray
    Train's (a sweep's trial passes Tune's report callback)."""
    import ray.train  # lazy: Ray stays off the start-up path of every command
    from ray.train.torch import TorchConfig, TorchTrainer  # lazy: as ray.train

    storage = resolve_location(config.storage, config.s3_endpoint)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        torch_config=TorchConfig(backend=backend_for(config.use_gpu)),
        scaling_config=ray.train.ScalingConfig(
            # (MIN, MAX): Ray Train starts once MIN workers fit, and every elastic_resize_monitor_interval_s
            # grows the group (a restart from the last checkpoint) when the cluster has room for more.
            num_workers=(config.num_workers, config.max_workers) if config.elastic else config.num_workers,
            elastic_resize_monitor_interval_s=config.elastic_resize_interval,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker or 1, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=storage.path,
            storage_filesystem=ray_filesystem(storage, config.s3_endpoint),  # Ray's own calls retry inside pyarrow
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            callbacks=callbacks,
        ),
    )


def absolute_locations(config: TrainConfig) -> TrainConfig:
    """`config` with local `--storage` and `--data-dir` made absolute: workers run in other folders."""
    data_dir = config.data_dir
    if data_dir and not is_s3(data_dir):
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    return config.replace(storage=resolve_location(config.storage, config.s3_endpoint).uri, data_dir=data_dir)


def run_training(config: TrainConfig, promotion: Promotion | None = None) -> int:
    """Train `config` on Ray Train, then promote the run if `promotion` says so.

    0 when training finished (and the promotion, if any, was made or declined), 1 when training
    failed, 2 on bad input (refused before any Ray work), PROMOTION_FAILED (3) when training
    finished but its promotion failed.
    """
    target = check_promotion(promotion, config.s3_endpoint) if promotion is not None else None
    run = preflight(config)
    config = warm_start_source(config, run)
    if target is not None:
        check_run_beside(run, target, flag="--promote-to")
        # a LATEST that is no pointer, a store that cannot do it
        check_target(target, config.s3_endpoint, flag="--promote-to")
    config = absolute_locations(config)
    if is_s3(config.storage) or is_s3(config.data_dir):
        # Workers use the endpoint the driver checked, whatever their own environment says.
        config = config.replace(s3_endpoint=endpoint_url(config.s3_endpoint))
    connect_ray()
    try:
        config = place(config)  # refuses what can never fit; waits while an autoscaler starts nodes
    except PlacementTimeout as err:
        print(f"gan-job: {err}", file=sys.stderr)
        return 1
    prepare_storage(config)

    trainer = build_trainer(config)
    print(
        f"training run {config.run_name}: {config.workers_text} worker(s) x {config.cpus_per_worker} CPU"
        + (" + 1 GPU" if config.use_gpu else "")
        + f", {config.epochs} epochs, global batch {config.batch_size}"
        + (", class-conditional" if config.conditional else "")
        + f"; storage {run.uri}",
        flush=True,
    )
    import ray.train  # lazy: Ray stays off the start-up path of every command

    try:
        result = in_own_thread(trainer.fit, "gan-job-fit")  # where Ray Train installs no SIGINT handler of its own
    except ray.train.TrainingFailedError as err:
        cause = worker_failure(err)
        if isinstance(cause, (UsageError, DataError, StorageRefused)):
            raise UsageError(str(cause)) from None
        print(
            f"gan-job: training failed after {config.max_failures} restart(s): {last_error_line(cause)}",
            file=sys.stderr,
        )
        return 1
    except ray.exceptions.RayError as err:  # Ray Train's controller lost, e.g. to storage it could not reach
        print(
            f"gan-job: training failed: Ray Train's controller stopped ({last_error_line(err)}); "
            f"the run's checkpoints and metrics in {run.uri} are kept: run the same command again to resume",
            file=sys.stderr,
        )
        return 1
    stopped = (result.metrics or {}).get("stopped")
    if stopped:  # a guard with --on-divergence/--on-collapse stop ended the run
        print(f"gan-job: run {config.run_name} stopped by a guard: {stopped}", file=sys.stderr)
        return 1
    print(f"run {config.run_name} finished: checkpoints and artifacts in {run.uri}", flush=True)
    if promotion is None:
        return 0
    return promote_finished_run(run, promotion, config)
