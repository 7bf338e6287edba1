"""The Ray Train side of the per-worker loop: a `WorkerSession` backed by `ray.train`."""

from __future__ import annotations

import functools
import posixpath
import shutil
import tempfile
from pathlib import Path

import torch

from job.storage.checkpoint import (
    latest_checkpoint_or_refuse,
    latest_good_checkpoint,
    read_checkpoint,
    upload_checkpoint,
    write_checkpoint,
)
from job.storage.checkpoint_schema import CheckpointError
from job.config import TrainConfig
from job.console import warn
from job.runtime.distributed import print0, select_device
from job.runtime.state import HostSnapshot
from job.runtime.streaming import StreamPlan
from job.storage.location import resolve_location
from job.runtime.loop import run_worker
from job.runtime.ray_logging import quiet_ray_data, quiet_ray_train_reports


STREAM_PLAN = "stream_plan"  # the key of a streamed run's `StreamPlan` in the train loop's config


class RaySession:
    """Rank, device, checkpoints, reports and (a streamed run's) data shard from Ray Train's context."""

    def __init__(self, config: TrainConfig, stream_plan: StreamPlan | None = None) -> None:
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()
        # Ray gives each GPU worker its own device; select_device only checks that it is there.
        self.device = ray.train.torch.get_device() if config.use_gpu else select_device(False)
        if config.use_gpu:
            select_device(True, self.device.index or 0)
        self.run = resolve_location(config.storage, config.s3_endpoint).child(config.run_name)
        self.stream_plan = stream_plan

    def stream(self) -> tuple[StreamPlan, object] | None:
        """A streamed run's plan and this rank's shard (a Ray Data `DataIterator`); None for a run in memory."""
        import ray.train

        if self.stream_plan is None:
            return None
        shard = ray.train.get_dataset_shard("train")
        quiet_ray_data()
        return self.stream_plan, shard

    def newest_of(self, registered: dict) -> dict:
        """Ray's registered checkpoint, or a newer good one of the run's: written whole by an attempt that ended
        before Ray Train registered it (a checkpoint inside an epoch, a few steps before a preemption)."""
        found = latest_good_checkpoint(self.run, [])
        if found is None or found[1]["step"] <= registered["step"]:
            return registered
        print0(f"resuming from {found[0].uri}, newer than Ray Train's latest registered checkpoint")
        return found[1]

    def load_checkpoint(self) -> dict | None:
        """Ray's latest registered checkpoint, read straight from storage; else the run's newest good one.

        Never a fresh start beside a run's own checkpoints: when Ray Train names none (its record was
        unreadable, or a one-process run wrote them), the run folder is looked at all the same. A
        storage read that fails raises (`job.storage.retry`), which fails this attempt; Ray Train then
        restarts the group, up to `--max-failures`.
        """
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        named = posixpath.basename(checkpoint.path.rstrip("/")) if checkpoint is not None else None
        if named is not None:
            try:
                return self.newest_of(read_checkpoint(self.run.child(named)))
            except CheckpointError as err:
                warn(f"latest checkpoint unusable, falling back to an older one: {err}")
        found = latest_checkpoint_or_refuse(self.run, "run")  # raises when only damaged ones are left
        if found is None and named is not None:
            raise CheckpointError(
                f"run {self.run.uri}: Ray Train's checkpoint {named} is unusable and no other checkpoint of the run "
                "loads; starting over would overwrite the run's history: restore a checkpoint_* folder, "
                "or use a new --run-name"
            )
        if found is not None and named is None:
            print0(
                f"Ray Train names no checkpoint of run {self.run.uri}; "
                f"resuming from its newest in storage, {found[0].uri}"
            )
        return found[1] if found else None

    def report(self, metrics: dict, checkpoint: HostSnapshot | None) -> None:
        """Ray Train's report; a checkpoint is serialised, hashed and stored on Ray's upload pool (all ranks call)."""
        import ray.train

        if checkpoint is None:
            ray.train.report(metrics)
            return
        # An empty folder for Ray to hand to the upload function, which fills and stores it in the background
        # while the next epoch trains. Ray then removes the folder, registers checkpoints in report order,
        # waits for the last upload before the run ends, and fails the worker group (which then resumes) if
        # an upload fails.
        checkpoint_dir = tempfile.mkdtemp(prefix="gan-ckpt-")
        try:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                delete_local_checkpoint_after_upload=True,
                checkpoint_upload_fn=functools.partial(self._upload, checkpoint),
            )
        except BaseException:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise

    def _upload(self, snapshot: HostSnapshot, checkpoint, checkpoint_dir_name: str):  # -> ray.train.Checkpoint
        """Ray Train's upload step: serialise and hash the snapshot, then store it so that a failed write fails
        the report (see `upload_checkpoint`): the state first, its digest last."""
        import ray.train

        storage = ray.train.get_context().get_storage()
        path = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
        write_checkpoint(Path(checkpoint.path), snapshot.wait())  # the one writer: state.pt, then its digest
        # Through this run's own filesystem (one attempt a call, under job.storage.retry's loop), not Ray's, whose
        # calls retry inside pyarrow: retries never multiply.
        upload_checkpoint(Path(checkpoint.path), self.run.child(checkpoint_dir_name))
        return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on each worker."""
    quiet_ray_train_reports()  # first: Ray's per-report line would repeat every epoch's metrics on every rank
    config = dict(config)
    stream_plan = config.pop(STREAM_PLAN, None)
    train_config = TrainConfig.from_dict(config)
    torch.set_num_threads(train_config.cpus_per_worker or 1)
    run_worker(train_config, RaySession(train_config, stream_plan))
