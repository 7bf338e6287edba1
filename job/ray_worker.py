"""The Ray Train side of the per-worker loop: a `WorkerSession` backed by `ray.train`."""

from __future__ import annotations

from pathlib import Path

import torch

from job.checkpoint import STATE_FILE, CheckpointError, decode_checkpoint, latest_good_checkpoint
from job.config import TrainConfig
from job.console import warn
from job.distributed import select_device
from job.storage import resolve_location
from job.worker import run_worker


class RaySession:
    """Rank, device, checkpoints and reports from Ray Train's context."""

    def __init__(self, config: TrainConfig) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        # Ray gives each GPU worker its own device; select_device only checks that it is there.
        self.device = ray.train.torch.get_device() if config.use_gpu else select_device(False)
        if config.use_gpu:
            select_device(True, self.device.index or 0)
        self.run = resolve_location(config.storage, config.s3_endpoint).child(config.run_name)

    def load_checkpoint(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        try:
            with checkpoint.as_directory() as folder:
                return decode_checkpoint((Path(folder) / STATE_FILE).read_bytes(), checkpoint.path)
        except (CheckpointError, OSError) as err:
            warn(f"latest checkpoint unusable, falling back to an older one: {err}")
            found = latest_good_checkpoint(self.run)
            return found[1] if found else None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on each worker."""
    train_config = TrainConfig.from_dict(config)
    torch.set_num_threads(train_config.cpus_per_worker or 1)
    run_worker(train_config, RaySession(train_config))
