"""A `WorkerSession` for one plain process with no Ray: rank 0 of 1, checkpoints kept like Ray's.

Used where Ray is absent or too heavy: the in-process GPU epoch check and fast loop tests.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path

import torch

from job.runtime.state import HostSnapshot
from job.storage.checkpoint import (
    CHECKPOINT_PREFIX,
    checkpoint_folders,
    latest_checkpoint_or_refuse,
    upload_checkpoint,
    write_checkpoint,
)
from job.storage.location import Location


class LocalSession:
    """Rank 0 of a world of 1; checkpoints go to `<run>/checkpoint_<timestamp>/` as Ray names them."""

    rank = 0
    world_size = 1
    node_id = "local"

    def __init__(self, run: Location, device: torch.device, keep_checkpoints: int = 2) -> None:
        self.run = run
        self.device = device
        self.keep_checkpoints = keep_checkpoints

    def stream(self) -> None:
        """No Ray Data in one process: a run here holds its images in memory."""
        return None

    def load_checkpoint(self) -> dict | None:
        found = latest_checkpoint_or_refuse(self.run, "run")  # never starts over beside damaged checkpoints
        return found[1] if found else None

    def report(self, metrics: dict, checkpoint: HostSnapshot | None) -> None:
        """Store the checkpoint at once (in this process there is no upload pool to hand it to)."""
        if checkpoint is None:
            return
        name = CHECKPOINT_PREFIX + datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
        checkpoint_dir = Path(tempfile.mkdtemp(prefix="gan-ckpt-"))
        try:
            write_checkpoint(checkpoint_dir, checkpoint.wait())
            upload_checkpoint(checkpoint_dir, self.run.child(name))
        finally:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        for stale in checkpoint_folders(self.run)[self.keep_checkpoints :]:
            stale.delete_folder()
