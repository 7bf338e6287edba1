"""The driver's side of a run, whole: `train` and each of `tune`'s trials go through it.

`check` does everything that needs no Ray (the data, the storage, where the weights come from), resolves every
option once (locations made absolute, the S3 endpoint pinned, `--init-from` a checkpoint folder) and hands back a
`DriverRun`; `launch` connects Ray, places the workers and prepares the storage; `build_trainer` and `fit` run it
on Ray Train and turn a worker's failure into the command's exit status. Nothing after `check` parses a location
string again. Why: docs/architecture.md#why-it-is-built-this-way
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Sequence

from gan.data import DataError
from gan.datasets import Dataset
from job.config import TrainConfig
from job.settings import DATASET_NAMES as DATA_NAMES
from job.errors import RunFailed, StorageRefused, UsageError
from job.runtime.data_loading import stream_settings
from job.runtime.distributed import backend_for
from job.runtime.interrupts import deferred_interrupts, in_own_thread, install_interrupt_handlers
from job.runtime.local_cluster import start_local_cluster
from job.runtime.placement import PlacementTimeout, place
from job.runtime.ray_session import STREAM_PLAN, train_loop_per_worker
from job.runtime.streaming import stream_inputs
from job.storage.checkpoint import latest_checkpoint_or_refuse, load_from
from job.storage.checkpoint_schema import check_resumable
from job.storage.data_source import dataset_of
from job.storage.location import Location, is_s3, ray_filesystem, resolve_location
from job.storage.pointer import resolve_latest
from job.storage.s3 import endpoint_url
from job.storage.s3_preflight import check_bucket, check_readable

SCRATCH, RESUME, WARM = "scratch", "resume", "warm"  # where a run's weights come from


@dataclass(frozen=True)
class DriverRun:
    """A run as the driver resolved it: every option once, and its locations."""

    config: TrainConfig  # absolute locations, the endpoint pinned, the data's shape and --init-from resolved; placed
    storage: Location  # --storage
    run: Location  # <storage>/<run-name>
    start: str  # SCRATCH, RESUME or WARM: `decide_start`'s answer
    data: dict[str, dict] = dataclasses.field(default_factory=dict)  # per dataset of the run (a sweep's each): its
    # resolved settings (`data_settings`), which every process of the run applies, so that all load the same


def check(config: TrainConfig, variants: Sequence[TrainConfig] = (), name_flag: str = "--run-name") -> DriverRun:
    """Every check that needs no Ray, and every option resolved once; `variants`: a sweep's configurations with
    the searched values, each of whose datasets and shapes is checked too; `name_flag`: the flag that named the
    run's folder (a sweep's is --sweep). Only reads: bad input leaves nothing."""
    storage = resolve_location(config.storage, config.s3_endpoint)
    config = absolute_data(config)
    variants = [absolute_data(variant) for variant in variants]
    data = {
        name: data_settings(config.replace(data=name)) for name in dict.fromkeys(v.data for v in (config, *variants))
    }
    config = config.replace(**data[config.data])
    variants = [variant.replace(**data[variant.data]) for variant in variants]
    check_storage(config, storage)
    run = storage.child(config.run_name)
    if run.is_file():
        raise UsageError(f"{name_flag} {config.run_name}: {run.uri} is a file, not a folder; name another {name_flag}")
    start, config = decide_start(config, run, variants)
    config = config.replace(storage=storage.uri)
    if is_s3(config.storage) or is_s3(config.data_dir) or is_s3(config.data):
        # Workers use the endpoint the driver checked, whatever their own environment says.
        config = config.replace(s3_endpoint=endpoint_url(config.s3_endpoint))
    return DriverRun(config, storage, run, start, data)


def absolute_data(config: TrainConfig) -> TrainConfig:
    """`config` with a local --data and --data-dir made absolute: workers run in other folders."""
    local = [name for name in ("data", "data_dir") if getattr(config, name) and not is_s3(getattr(config, name))]
    changes = {name: os.path.abspath(os.path.expanduser(getattr(config, name))) for name in local}
    if config.data in DATA_NAMES:
        changes.pop("data", None)
    return config.replace(**changes)


def data_settings(config: TrainConfig) -> dict:
    """The settings every process of the run loads `config.data` with: in memory or streamed (`--data-loading`),
    its shape, as given or the images' own, its classes (a conditional run's), and the fingerprint and cutoff of its
    files as they are now (a folder or prefix that grows is seen by every worker as it was here). In memory, the data
    is found, read and packed into this node's cache here: a damaged or unusable file fails now, not in every
    worker; the line it prints says what it found."""
    for flag, where in (("--data", config.data), ("--data-dir", config.data_dir)):
        if is_s3(where):
            check_bucket(where, config.s3_endpoint, flag=flag, write=False)  # in seconds, not after the retries
    settings = stream_settings(config) or memory_settings(config)
    if config.conditional and not settings["num_classes"]:
        raise UsageError(
            f"--conditional needs labelled images, and --data {config.data} has no classes (its images are not in "
            "class folders, nor labelled by a dataset.json); drop --conditional, or label the images"
        )
    return {**settings, "num_classes": settings["num_classes"] if config.conditional else None}


def memory_settings(config: TrainConfig) -> dict:
    """`data_settings` for a run that holds its images in memory: found, read and packed into this node's cache."""
    dataset = dataset_of(config)
    say_data(dataset)
    return {
        "resolution": dataset.resolution,
        "channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "data_fingerprint": dataset.fingerprint,
        "data_cutoff_ns": dataset.newest_ns,
        "data_loading": "memory",
    }


def say_data(dataset: Dataset) -> None:
    """One line: what the data is, its splits and shape, and whether it was decoded now (how fast) or cached."""
    classes = f"{dataset.num_classes} classes" if dataset.num_classes else "unlabelled"
    skipped = f", {dataset.skipped} non-image file(s) skipped" if dataset.skipped else ""
    packed = (
        f"decoded at {dataset.decoded_per_s:,.0f} images/s into this node's cache"
        if dataset.decoded_per_s is not None
        else "from this node's cache"
        if dataset.kind != "idx"
        else "its IDX files"
    )
    print(
        f"data {dataset.name}: {dataset.train.images.shape[0]:,} training and {dataset.test.images.shape[0]:,} test "
        f"images, {classes}, {dataset.channels}x{dataset.resolution}x{dataset.resolution}{skipped}; {packed}",
        flush=True,
    )


def check_storage(config: TrainConfig, storage: Location) -> None:
    """The storage, reachable and writable (or creatable), written nothing yet."""
    if is_s3(config.storage):
        check_bucket(config.storage, config.s3_endpoint, flag="--storage", create=config.create_bucket)
    else:
        check_creatable(storage.path, config.storage)


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


def decide_start(config: TrainConfig, run: Location, variants: Sequence[TrainConfig] = ()) -> tuple[str, TrainConfig]:
    """Where the run's weights come from, decided here and nowhere else, as nanoGPT's one `init_from` block: its
    own newest checkpoint (RESUME; then --init-from is not used), else --init-from's (WARM, resolved to one checkpoint
    folder that fits `config` and each of `variants`, so every rank and restart loads the same), else SCRATCH.
    The workers follow it; a restarted worker group resumes from the run's own checkpoints, as RESUME does."""
    found = latest_checkpoint_or_refuse(run, "run")
    if found is not None:
        check_resumable(config, found[1])
        if config.init_from:
            print(
                f"note: run {config.run_name} has checkpoints of its own and resumes from them; --init-from is not used"
            )
        return RESUME, config.replace(init_from=None)
    if config.init_from is None:
        return SCRATCH, config
    check_readable(config.init_from, config.s3_endpoint, "--init-from")
    named = resolve_latest(config.init_from, config.s3_endpoint, "--init-from")
    source, donor = load_from(named, config.s3_endpoint, flag="--init-from")
    for variant in (config, *variants):
        check_resumable(variant, donor, init_from=source.uri)
    return WARM, config.replace(init_from=source.uri)


def launch(run: DriverRun, resources: dict[str, float] | None = None) -> DriverRun:
    """Ray connected, the workers placed (refused at once when no node can ever hold them; waited for while an
    autoscaler starts nodes) and the storage prepared; `resources`: custom resources a local cluster declares."""
    connect_ray(resources)
    try:
        config = place(run.config)
    except PlacementTimeout as err:
        raise RunFailed(str(err)) from None
    if run.storage.is_local:
        try:
            os.makedirs(run.storage.path, exist_ok=True)
        except OSError as err:
            raise UsageError(
                f"--storage {run.storage.uri} cannot be created ({err.strerror}); pass a writable folder"
            ) from None
    return dataclasses.replace(run, config=config)


def connect_ray(resources: dict[str, float] | None = None) -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS), or start a local one of this machine's own, listening on
    loopback only (`job.runtime.local_cluster`). `resources`: custom resources the local cluster declares (a
    sweep's trial drivers take one each); a joined cluster declares its own."""
    import ray

    if ray.is_initialized():
        return
    with deferred_interrupts():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level="WARNING", log_to_driver=True)
        else:
            start_local_cluster(resources)
        install_interrupt_handlers()  # again: ray.init replaced the SIGTERM one with its own


def build_trainer(run: DriverRun, callbacks: list | None = None):  # -> ray.train.torch.TorchTrainer
    """The TorchTrainer for `run`: scaling, backend, storage, checkpoint and failure policy; `callbacks` are Ray
    Train's (a sweep's trial passes Tune's report callback)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    config = run.config
    streamed = {}
    loop_config = config.to_dict()
    if config.data_loading == "stream":
        datasets, data_config, plan = stream_inputs(config, run.run.uri)
        streamed = {"datasets": datasets, "dataset_config": data_config}
        loop_config[STREAM_PLAN] = plan
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        **streamed,
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
            storage_path=run.storage.path,
            storage_filesystem=ray_filesystem(run.storage, config.s3_endpoint),  # Ray's own calls retry as ours do
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            callbacks=callbacks,
        ),
    )


def fit(trainer, run: DriverRun):  # trainer: TorchTrainer -> ray.train.Result
    """Ray Train's `fit`, its failures as the command's: a worker's bad input is bad input (exit 2), a run that
    failed past its restarts, lost its controller or was stopped by a guard is RunFailed (exit 1, one line)."""
    import ray.train

    config = run.config
    try:
        result = in_own_thread(trainer.fit, "gan-job-fit")  # where Ray Train installs no SIGINT handler of its own
    except ray.train.TrainingFailedError as err:
        cause = worker_failure(err)
        if isinstance(cause, (UsageError, DataError, StorageRefused)):
            raise UsageError(str(cause)) from None
        raise RunFailed(f"training failed after {config.max_failures} restart(s): {last_error_line(cause)}") from None
    except ray.exceptions.RayError as err:  # Ray Train's controller lost, e.g. to storage it could not reach
        raise RunFailed(
            f"training failed: Ray Train's controller stopped ({last_error_line(err)}); the run's checkpoints and "
            f"metrics in {run.run.uri} are kept: run the same command again to resume"
        ) from None
    stopped = (result.metrics or {}).get("stopped")
    if stopped:  # a guard with --on-divergence/--on-collapse stop ended the run
        raise RunFailed(f"run {config.run_name} stopped by a guard: {stopped}")
    return result


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


def say_training(run: DriverRun) -> None:
    """The line that opens a run: its workers, epochs, batch and where it goes."""
    config = run.config
    print(
        f"training run {config.run_name}: {config.workers_text} worker(s) x {config.cpus_per_worker} CPU"
        + (" + 1 GPU" if config.use_gpu else "")
        + f", {config.epochs} epochs, global batch {config.batch_size}"
        + (", class-conditional" if config.conditional else "")
        + (", images streamed through Ray Data" if config.data_loading == "stream" else ", images in memory")
        + f"; storage {run.run.uri}",
        flush=True,
    )
