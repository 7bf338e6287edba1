"""The training configuration: one frozen, typed dataclass, validated where it is built."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, fields

from job.errors import UsageError, flag_name

DATASET_NAMES = ("mnist", "fashion-mnist")
PRECISIONS = ("auto", "fp32", "bf16")
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_storage() -> str:
    """Where runs go when `--storage` is not given: a folder in the user's home."""
    return os.path.join(os.path.expanduser("~"), "gan-job-runs")


def ray_submission_id() -> str | None:
    """The submission id of the Ray job this driver runs as, if `ray job submit` started it."""
    # The job supervisor hands the driver its job config, submission id included, in this variable.
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id") or None
    except (ValueError, AttributeError):
        return None


def default_run_name() -> str:
    """The Ray job's submission id under `ray job submit`, else a timestamp."""
    return ray_submission_id() or time.strftime("run-%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the defaults are the tutorial's recipe."""

    data: str = "mnist"  # dataset name; MNIST as in the tutorial
    data_dir: str | None = None  # folder or s3:// prefix with the four IDX files; None = cache, system copy, download
    epochs: int = 50  # total epochs of the run (the tutorial's EPOCHS)
    batch_size: int = 256  # global batch, split evenly across workers (the tutorial's BATCH_SIZE)
    num_workers: int = 1  # Ray Train workers, one DDP rank each
    use_gpu: bool = False  # one GPU per worker, NCCL between them
    storage: str = dataclasses.field(default_factory=default_storage)  # folder or s3:// prefix holding runs
    run_name: str = dataclasses.field(default_factory=default_run_name)  # folder under storage; same name = resume
    limit: int | None = None  # train on the first N images only; None = all
    seed: int = 0  # seeds weights, noise, shuffling and the fixed sample noise
    checkpoint_every: int = 1  # epochs between checkpoints; the last epoch always gets one
    keep_checkpoints: int = 2  # checkpoints kept in storage; 2 so a damaged latest has a fallback
    max_failures: int = 2  # worker-group restarts Ray Train makes before giving up
    cpus_per_worker: int | None = None  # CPUs (and torch threads) per worker; None = node CPUs / workers
    lr: float = 1e-4  # Adam learning rate of both networks (the tutorial's 1e-4)
    noise_dim: int = 100  # length of G's input noise vector
    precision: str = "auto"  # "auto" = bf16 autocast where the hardware does bf16 natively, else fp32
    s3_endpoint: str | None = None  # S3 endpoint URL; None = AWS_ENDPOINT_URL or AWS's default
    create_bucket: bool = False  # create a missing bucket instead of failing

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if self.data not in DATASET_NAMES:
            raise UsageError(f"--data {self.data!r} is not a known dataset; choose one of: {', '.join(DATASET_NAMES)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is not one of: {', '.join(PRECISIONS)}")
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("num_workers", 1),
            ("checkpoint_every", 1),
            ("keep_checkpoints", 1),
            ("max_failures", 0),
            ("noise_dim", 1),
            ("seed", 0),
            ("limit", 1),
            ("cpus_per_worker", 1),
        ):
            value = getattr(self, name)
            if value is None and name in ("limit", "cpus_per_worker"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{flag_name(name)} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise UsageError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if self.batch_size % self.num_workers:
            raise UsageError(
                f"--batch-size {self.batch_size} does not split evenly across --num-workers {self.num_workers}; "
                f"use a multiple of {self.num_workers}"
            )
        if self.limit is not None and self.limit < self.num_workers:
            raise UsageError(f"--limit {self.limit} leaves no image for some of the {self.num_workers} workers")
        if not RUN_NAME_PATTERN.match(self.run_name) or ".." in self.run_name:
            raise UsageError(
                f"--run-name {self.run_name!r} is not a valid folder or key name; use letters, digits, '.', '_' "
                "and '-' (at most 128, starting with a letter or digit)"
            )

    @property
    def batch_size_per_worker(self) -> int:
        return self.batch_size // self.num_workers

    def to_dict(self) -> dict:
        """Plain values only: what Ray hands to workers and what checkpoints and model.json hold."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Rebuild from `to_dict`'s output, ignoring fields this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Fields that decide the shapes in a checkpoint: resuming with other values cannot load it.
SHAPE_FIELDS = ("noise_dim",)
