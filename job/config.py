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
GUARD_ACTIONS = ("warn", "rollback", "stop")

# Hyperparameters a recipe sets; any flag given explicitly wins over its recipe.
RECIPES = {
    # The tutorial's, unchanged: Adam(1e-4) with Keras's default beta1, no averaging.
    "tutorial": {"batch_size": 256, "lr": 1e-4, "beta1": 0.9, "ema_decay": 0.0},
    # The DCGAN paper's Adam (2e-4, beta1 0.5), four times the steps per epoch of batch 256, and an
    # EMA of G's weights; chosen by measurement (see the README's Quality numbers).
    "stable": {"batch_size": 64, "lr": 2e-4, "beta1": 0.5, "ema_decay": 0.999},
}
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: "$" would let "name\n" through
MAX_SEED = 2**32 - 1  # torch takes seeds below 2**64; seed + epoch and seed + rank must stay there


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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the defaults are the tutorial's recipe."""

    data: str = "mnist"  # dataset name; MNIST as in the tutorial
    data_dir: str | None = None  # folder or s3:// prefix with the four IDX files; None = cache, system copy, download
    epochs: int = 50  # total epochs of the run (the tutorial's EPOCHS)
    batch_size: int | None = None  # global batch, split evenly across workers; None = the recipe's (tutorial: 256)
    num_workers: int = 1  # Ray Train workers, one DDP rank each; the minimum of an elastic run
    max_workers: int | None = None  # the maximum of an elastic run (--num-workers MIN-MAX); None = num_workers
    elastic_resize_interval: float = 60.0  # seconds between Ray Train's checks for room to grow an elastic run
    use_gpu: bool = False  # one GPU per worker, NCCL between them
    storage: str = dataclasses.field(default_factory=default_storage)  # folder or s3:// prefix holding runs
    run_name: str = dataclasses.field(default_factory=default_run_name)  # folder under storage; same name = resume
    limit: int | None = None  # train on the first N images only; None = all
    seed: int = 0  # seeds weights, noise, shuffling and the fixed sample noise
    checkpoint_every: int = 1  # epochs between checkpoints; the last epoch always gets one
    keep_checkpoints: int = 2  # checkpoints kept in storage; 2 so a damaged latest has a fallback
    max_failures: int = 2  # worker-group restarts Ray Train makes before giving up
    cpus_per_worker: int | None = None  # CPUs (and torch threads) per worker; None = the largest node's CPUs / workers
    placement_timeout: int = 600  # seconds to wait for an autoscaler to start the workers' nodes
    recipe: str = "tutorial"  # hyperparameter set: "tutorial" (unchanged) or "stable" (see RECIPES)
    lr: float | None = None  # Adam learning rate of both networks; None = the recipe's
    beta1: float | None = None  # Adam beta1 of both networks; None = the recipe's
    ema_decay: float | None = None  # decay of the EMA of G's weights, 0 = off; None = the recipe's
    eval_every: int = 1  # epochs between quality evaluations (FID, coverage) in training; 0 = never
    eval_num: int = 2000  # generated images per training-time evaluation
    on_divergence: str = "rollback"  # non-finite loss or saturated D: warn, rollback or stop
    on_collapse: str = "warn"  # class coverage far below the run's recent level: warn, rollback or stop
    noise_dim: int = 100  # length of G's input noise vector
    precision: str = "auto"  # "auto" = bf16 autocast where the hardware does bf16 natively, else fp32
    s3_endpoint: str | None = None  # S3 endpoint URL; None = AWS_ENDPOINT_URL or AWS's default
    create_bucket: bool = False  # create a missing bucket instead of failing

    def __post_init__(self) -> None:
        if self.max_workers is None:
            object.__setattr__(self, "max_workers", self.num_workers)  # frozen: filled once, here
        if self.recipe not in RECIPES:
            raise UsageError(f"--recipe {self.recipe!r} is not one of: {', '.join(RECIPES)}")
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: filled once, here
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
            ("eval_every", 0),
            ("eval_num", 10),
            ("placement_timeout", 1),
            ("max_workers", 1),
        ):
            value = getattr(self, name)
            if value is None and name in ("limit", "cpus_per_worker"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{flag_name(name)} must be an integer >= {low}, got {value!r}")
        if self.seed > MAX_SEED:
            raise UsageError(f"--seed must be an integer in [0, {MAX_SEED}], got {self.seed}")
        if not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise UsageError(f"--lr must be a finite number > 0, got {self.lr!r}")
        for name in ("beta1", "ema_decay"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise UsageError(f"{flag_name(name)} must be a number in [0, 1), got {value!r}")
        for name in ("on_divergence", "on_collapse"):
            if getattr(self, name) not in GUARD_ACTIONS:
                raise UsageError(f"{flag_name(name)} {getattr(self, name)!r} is not one of: {', '.join(GUARD_ACTIONS)}")
        if self.max_workers < self.num_workers:
            raise UsageError(f"--num-workers {self.num_workers}-{self.max_workers}: the maximum is below the minimum; use MIN-MAX with MIN <= MAX")
        if not _is_number(self.elastic_resize_interval) or not math.isfinite(self.elastic_resize_interval) or self.elastic_resize_interval <= 0:
            raise UsageError(f"--elastic-resize-interval must be a finite number of seconds > 0, got {self.elastic_resize_interval!r}")
        # Every world size the run may take splits the global batch exactly: the optimisation is
        # the same at any size (same batch, learning rate and steps per epoch).
        uneven = [size for size in self.world_sizes if self.batch_size % size]
        if uneven:
            sizes = ", ".join(map(str, uneven))
            raise UsageError(
                f"--batch-size {self.batch_size} does not split evenly across --num-workers {self.workers_text} "
                f"(not for {sizes} workers); use a multiple of {math.lcm(*self.world_sizes)}"
            )
        if self.limit is not None and self.limit < self.max_workers:
            raise UsageError(f"--limit {self.limit} leaves no image for some of the {self.max_workers} workers")
        if not RUN_NAME_PATTERN.fullmatch(self.run_name) or ".." in self.run_name:
            raise UsageError(
                f"--run-name {self.run_name!r} is not a valid folder or key name; use letters, digits, '.', '_' "
                "and '-' (at most 128, starting with a letter or digit)"
            )

    @property
    def world_sizes(self) -> range:
        """Every number of workers the run may have: one for a fixed run, MIN..MAX for an elastic one."""
        return range(self.num_workers, self.max_workers + 1)

    @property
    def elastic(self) -> bool:
        return self.max_workers > self.num_workers

    @property
    def workers_text(self) -> str:
        """--num-workers as the user wrote it: N, or MIN-MAX."""
        return f"{self.num_workers}-{self.max_workers}" if self.elastic else str(self.num_workers)

    @property
    def shard_multiple(self) -> int:
        """Images per epoch are a multiple of this, so that every world size runs the same steps per epoch."""
        return math.lcm(*self.world_sizes)

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
