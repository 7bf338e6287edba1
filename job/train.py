"""The `train` command's driver: checks everything it can, then hands the run to Ray Train."""

from __future__ import annotations

import os
import sys

from gan.data import DataError, load_split, resolve_data_dir
from job.checkpoint import latest_checkpoint_or_refuse
from job.config import TrainConfig
from job.data_source import fetch_from_bucket
from job.distributed import backend_for
from job.errors import UsageError
from job.placement import PlacementTimeout, place
from job.storage import Location, is_s3, resolve_location
from job.worker import check_resumable


def preflight(config: TrainConfig) -> Location:
    """Fail fast, before any worker starts: data, storage and resumability. Returns the run folder.

    Everything here only reads (the S3 check's marker object is deleted again), so that bad input
    leaves nothing behind; `prepare_storage` writes, once every check has passed.
    """
    storage = resolve_location(config.storage, config.s3_endpoint)
    if is_s3(config.data_dir):
        from job.s3_preflight import check_bucket

        check_bucket(config.data_dir, config.s3_endpoint, flag="--data-dir", write=False)
        data_folder = fetch_from_bucket(config.data_dir, config.s3_endpoint)  # local workers then find it in the cache
    else:
        data_folder = resolve_data_dir(config.data, config.data_dir)
    load_split(data_folder, "train", config.limit)  # a damaged or wrong-shaped file fails here, not in every worker
    if is_s3(config.storage):
        from job.s3_preflight import check_bucket

        check_bucket(config.storage, config.s3_endpoint, flag="--storage", create=config.create_bucket)
    else:
        check_creatable(storage.path, config.storage)
    run = storage.child(config.run_name)
    found = latest_checkpoint_or_refuse(run, "run")
    if found is not None:
        check_resumable(config, found[1])
    return run


def check_creatable(path: str, flag_value: str) -> None:
    """Refuse a local storage folder that cannot be made, without making it yet."""
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--storage {flag_value} cannot be created or written ({existing} is not a writable folder); pass a writable folder")


def prepare_storage(config: TrainConfig) -> None:
    """Create a local storage folder (a bucket needs nothing)."""
    storage = resolve_location(config.storage, config.s3_endpoint)
    if storage.is_local:
        try:
            os.makedirs(storage.path, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--storage {config.storage} cannot be created ({err.strerror}); pass a writable folder") from None


def connect_ray() -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS) or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="WARNING", log_to_driver=True)


def worker_failure(error: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray Train's wrappers."""
    failures = getattr(error, "worker_failures", None)
    cause = next(iter(failures.values())) if failures else getattr(error, "controller_failure", error)
    return getattr(cause, "cause", None) or cause


def build_trainer(config: TrainConfig):  # -> ray.train.torch.TorchTrainer (Ray stays a lazy import)
    """The TorchTrainer for `config`: scaling, backend, storage, checkpoint and failure policy."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from job.ray_worker import train_loop_per_worker

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
            storage_filesystem=storage.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
    )


def absolute_locations(config: TrainConfig) -> TrainConfig:
    """`config` with local `--storage` and `--data-dir` made absolute: workers run in other folders."""
    data_dir = config.data_dir
    if data_dir and not is_s3(data_dir):
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    return config.replace(storage=resolve_location(config.storage, config.s3_endpoint).uri, data_dir=data_dir)


def run_training(config: TrainConfig) -> int:
    """Train `config` on Ray Train; 0 on success, 2 on bad input, 1 when training failed."""
    run = preflight(config)
    config = absolute_locations(config)
    if is_s3(config.storage) or is_s3(config.data_dir):
        from job.s3 import endpoint_url

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
        + f", {config.epochs} epochs, global batch {config.batch_size}; storage {run.uri}",
        flush=True,
    )
    import ray.train

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        cause = worker_failure(err)
        if isinstance(cause, (UsageError, DataError)):
            raise UsageError(str(cause)) from None
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        print(f"gan-job: training failed after {config.max_failures} restart(s): {message}", file=sys.stderr)
        return 1
    stopped = (result.metrics or {}).get("stopped")
    if stopped:  # a guard with --on-divergence/--on-collapse stop ended the run
        print(f"gan-job: run {config.run_name} stopped by a guard: {stopped}", file=sys.stderr)
        return 1
    print(f"run {config.run_name} finished: checkpoints and artifacts in {run.uri}", flush=True)
    return 0
