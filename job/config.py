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
from job.settings import (
    CUDA_GRAPHS_MODES,
    DATA_LOADINGS,
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_EVAL_IMAGES,
    MAX_LIMIT,
    MAX_NOISE_DIM,
    MAX_SECONDS,
    MAX_SEED,
    MAX_STEPS,
    MAX_WORKERS,
    PRECISIONS,
    CHANNELS,
    RESOLUTIONS,
    Setting,
    check_endpoint_url,
    data_text,
    one_of,
    declared,
    read_endpoint_url,
    setting,
)

GUARD_ACTIONS = ("warn", "rollback", "stop")

# Hyperparameters a recipe sets; any flag given explicitly wins over its recipe.
RECIPES = {
    # The tutorial's, unchanged: Adam(1e-4) with Keras's default beta1, no averaging.
    "tutorial": {"batch_size": 256, "lr": 1e-4, "beta1": 0.9, "ema_decay": 0.0},
    # The DCGAN paper's Adam (2e-4, beta1 0.5), four times the steps per epoch of batch 256, and an
    # EMA of G's weights; chosen by measurement (docs/quality.md).
    "stable": {"batch_size": 64, "lr": 2e-4, "beta1": 0.5, "ema_decay": 0.999},
}
# `stable` plus the dataset's labels: G and D class-conditional (a recipe's switch turns it on).
RECIPES["conditional"] = {**RECIPES["stable"], "conditional": True}
# used with fullmatch: "$" would let "name\n" through
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def worker_range(text: str) -> tuple[int, int]:
    """`--num-workers`: N (a fixed group) or MIN-MAX (an elastic one), 1 <= MIN <= MAX <= MAX_WORKERS."""
    low, dash, high = text.strip().partition("-")
    try:
        bounds = (int(low), int(high) if dash else int(low))
    except ValueError:
        raise ValueError(f"{text!r} is not N or MIN-MAX; use e.g. 2, or 1-4") from None
    if not 1 <= bounds[0] <= bounds[1] <= MAX_WORKERS:
        raise ValueError(f"{text!r} is not N or MIN-MAX with 1 <= MIN <= MAX <= {MAX_WORKERS}; use e.g. 2, or 1-4")
    return bounds


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

    # Each setting is declared once, here: its flag (--<name>), its GAN_JOB_<NAME> variable, kind,
    # bounds, choices, default and help. job/cli.py builds `train`'s flags from these declarations.
    data: str = setting(
        "mnist",
        metavar="NAME|PATH|s3://bucket/prefix",
        reads=data_text,
        help="the images: mnist (default, as the tutorial), fashion-mnist, cifar10, or a folder, ZIP, CIFAR-10 "
        "tarball or s3://bucket/prefix of your own (docs/data.md)",
    )
    data_dir: str | None = setting(
        None,
        metavar="DIR|s3://bucket/prefix",
        help="for mnist, fashion-mnist or cifar10: a folder or s3://bucket/prefix with their files (the four IDX "
        "files; cifar-10-binary.tar.gz) (default: cache, system copy, download)",
    )
    resolution: int | None = setting(
        None,
        kind=int,
        low=min(RESOLUTIONS),
        high=max(RESOLUTIONS),
        reads=one_of(RESOLUTIONS),
        metavar="{" + ",".join(map(str, RESOLUTIONS)) + "}",
        help="square image size the networks are built for; other images are centre-cropped and resized "
        "(default: the images' own)",
    )
    channels: int | None = setting(
        None,
        kind=int,
        low=1,
        high=3,
        reads=one_of(CHANNELS),
        metavar="{1,3}",
        help="1 (grey) or 3 (colour) (default: the images' own)",
    )
    epochs: int = setting(
        50, kind=int, low=1, high=MAX_EPOCHS, help="total epochs of the run (default 50, the tutorial's)"
    )
    batch_size: int | None = setting(
        None,
        kind=int,
        low=1,
        high=MAX_BATCH,
        help="global batch, split evenly across workers (default: the recipe's; tutorial 256)",
    )
    num_workers: int = setting(
        1,
        kind=int,
        low=1,
        high=MAX_WORKERS,
        reads=worker_range,
        metavar="N|MIN-MAX",
        help="Ray Train workers, one DDP rank each: N, or MIN-MAX to grow with the cluster (default 1)",
    )
    max_workers: int | None = None  # the maximum of an elastic run (--num-workers MIN-MAX); None = num_workers
    # Set by the driver from the data it checked (not flags): what every worker loads must be the same.
    num_classes: int | None = None  # a conditional run's classes; None: unconditional, or not yet resolved
    data_fingerprint: str | None = None  # of the data's listing as the run started
    data_cutoff_ns: int | None = None  # a folder's or prefix's files changed after this are left out
    elastic_resize_interval: float = setting(
        60.0,
        kind=float,
        low=0,
        low_open=True,
        high=MAX_SECONDS,
        help="with --num-workers MIN-MAX: seconds between checks for room to grow (default 60)",
    )
    use_gpu: bool = setting(False, kind=bool, help="one GPU per worker, NCCL between workers")
    storage: str = setting(
        factory=default_storage,
        metavar="DIR|s3://bucket/prefix",
        help="folder or s3://bucket/prefix for runs (default ~/gan-job-runs)",
    )
    run_name: str = setting(
        factory=default_run_name,
        help="run folder under storage; the same name again resumes (default: the Ray submission id, else a timestamp)",
    )
    limit: int | None = setting(
        None, kind=int, low=1, high=MAX_LIMIT, help="train on the first N images only (default: all)"
    )
    seed: int = setting(
        0, kind=int, low=0, high=MAX_SEED, help="seed of weights, noise, shuffling and sample noise (default 0)"
    )
    checkpoint_every: int = setting(
        1,
        kind=int,
        low=1,
        high=MAX_EPOCHS,
        help="epochs between checkpoints; the last epoch always gets one (default 1)",
    )
    checkpoint_every_steps: int | None = setting(
        None,
        kind=int,
        low=1,
        high=MAX_STEPS,
        help="also a checkpoint every N steps inside an epoch, with the position in it: a restart redoes at most N "
        "steps (default: at the ends of epochs only)",
    )
    data_loading: str = setting(
        "auto",
        choices=DATA_LOADINGS,
        help="memory: every worker holds the packed images; stream: Ray Data reads and decodes a folder or ZIP "
        "(local or S3) while the workers train; auto (default): stream when the packed images would take more than "
        "a quarter of a worker's memory (docs/data.md#streaming)",
    )
    init_from: str | None = setting(
        None,
        metavar="CHECKPOINT|RUN|LATEST",
        help="warm start a new run from this checkpoint folder, run folder (its latest) or LATEST pointer: weights, "
        "both optimizers' state and the EMA, then this run's --lr and --beta1; a run with checkpoints of its own "
        "resumes from them instead",
    )
    keep_checkpoints: int = setting(
        2,
        kind=int,
        low=1,
        high=1000,
        help="checkpoints kept in storage (default 2, so a damaged latest has a fallback)",
    )
    max_failures: int = setting(
        2, kind=int, low=0, high=1000, help="worker-group restarts before the run fails (default 2)"
    )
    cpus_per_worker: int | None = setting(
        None,
        kind=int,
        low=1,
        high=MAX_WORKERS,
        help="CPUs and torch threads per worker (default: the largest node type's CPUs / workers)",
    )
    placement_timeout: int = setting(
        600,
        kind=int,
        low=1,
        high=MAX_SECONDS,
        help="seconds to wait for an autoscaler to start the workers' nodes before giving up (default 600)",
    )
    recipe: str = setting(
        "tutorial",
        choices=tuple(RECIPES),
        help="hyperparameters: tutorial (default, the tutorial's unchanged), stable, "
        "or conditional (stable's, with --conditional)",
    )
    lr: float | None = setting(
        None,
        kind=float,
        low=0,
        low_open=True,
        high=1.0,
        help="Adam learning rate of both networks (default: the recipe's; tutorial 1e-4)",
    )
    beta1: float | None = setting(
        None,
        kind=float,
        low=0,
        high=1,
        high_open=True,
        help="Adam beta1 of both networks (default: the recipe's; tutorial 0.9)",
    )
    ema_decay: float | None = setting(
        None,
        kind=float,
        low=0,
        high=1,
        high_open=True,
        help="decay of an EMA of G's weights used for samples and the model, 0 = off (default: the recipe's)",
    )
    conditional: bool = setting(
        False,
        kind=bool,
        help="class-conditional: G and D trained on the dataset's labels, samples one row per class "
        "(on with --recipe conditional)",
    )
    eval_every: int = setting(
        1,
        kind=int,
        low=0,
        high=MAX_EPOCHS,
        help="epochs between quality evaluations during training, 0 = never (default 1)",
    )
    eval_num: int = setting(
        2000,
        kind=int,
        low=10,
        high=MAX_EVAL_IMAGES,
        help="generated images per training-time evaluation (default 2000)",
    )
    on_divergence: str = setting(
        "rollback", choices=GUARD_ACTIONS, help="non-finite loss or saturated D: warn, rollback (default) or stop"
    )
    on_collapse: str = setting(
        "warn",
        choices=GUARD_ACTIONS,
        help="coverage far below the run's recent level: warn (default), rollback or stop",
    )
    noise_dim: int = setting(
        100, kind=int, low=1, high=MAX_NOISE_DIM, help="length of the generator's noise vector (default 100)"
    )
    precision: str = setting(
        "auto",
        choices=PRECISIONS,
        help="auto (default: bf16 autocast on a CPU that does bf16 natively, fp32 on a GPU: each measured faster), "
        "fp32 or bf16",
    )
    cuda_graphs: str = setting(
        "auto",
        choices=CUDA_GRAPHS_MODES,
        help="replay the whole training step as CUDA graphs on GPU workers: on (needs --use-gpu), off, or auto "
        "(default; off until benchmarks/gpu_check.py has shown on a GPU that graphed equals eager and is faster)",
    )
    s3_endpoint: str | None = setting(
        None,
        metavar="URL",
        reads=read_endpoint_url,
        help="S3 endpoint URL, e.g. http://minio:9000 (default: AWS_ENDPOINT_URL)",
    )
    create_bucket: bool = setting(False, kind=bool, help="create the --storage bucket if it is missing")

    def __post_init__(self) -> None:
        if self.max_workers is None:
            object.__setattr__(self, "max_workers", self.num_workers)  # frozen: filled once, here
        if self.recipe not in RECIPES:
            raise UsageError(f"--recipe {self.recipe!r} is not one of: {', '.join(RECIPES)}")
        for name, value in RECIPES[self.recipe].items():
            # A recipe fills what was not given; its switch turns a switch on (a switch has no "off" flag
            # to win over it).
            if getattr(self, name) is None or value is True:
                object.__setattr__(self, name, value)  # frozen: filled once, here
        self._validate()

    def _validate(self) -> None:
        for name, spec in SETTINGS.items():
            value = getattr(self, name)
            if value is not None or name not in UNSET_ALLOWED:  # None means "not set" only where the default is None
                spec.check(flag_name(name), value)
        SETTINGS["num_workers"].check("--num-workers (its maximum)", self.max_workers)
        for flag, reader, value in (
            ("--data", data_text, self.data),
            ("--resolution", one_of(RESOLUTIONS), self.resolution),
            ("--channels", one_of(CHANNELS), self.channels),
        ):
            if value is not None:
                try:
                    reader(str(value))
                except ValueError as err:
                    raise UsageError(f"{flag} {err}") from None
        if self.max_workers < self.num_workers:
            raise UsageError(
                f"--num-workers {self.num_workers}-{self.max_workers}: the maximum is below the minimum; "
                "use MIN-MAX with MIN <= MAX"
            )
        # Every world size the run may take splits the global batch exactly: the optimisation is
        # the same at any size (same batch, learning rate and steps per epoch).
        uneven = [size for size in self.world_sizes if self.batch_size % size]
        if uneven:
            sizes = ", ".join(map(str, uneven))
            raise UsageError(
                f"--batch-size {self.batch_size} does not split evenly across --num-workers {self.workers_text} "
                f"(not for {sizes} workers); use a multiple of {math.lcm(*self.world_sizes)}"
            )
        if self.cuda_graphs == "on" and not self.use_gpu:
            raise UsageError("--cuda-graphs on needs CUDA GPUs: add --use-gpu, or use --cuda-graphs off")
        if self.limit is not None and self.limit < self.max_workers:
            raise UsageError(f"--limit {self.limit} leaves no image for some of the {self.max_workers} workers")
        if self.init_from is not None and not self.init_from.strip():
            raise UsageError(
                "--init-from is empty; pass a checkpoint folder, a run folder or a LATEST pointer, or leave it out"
            )
        if self.s3_endpoint is not None:
            check_endpoint_url(self.s3_endpoint)  # checked even where no S3 location uses it
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


# The declaration of every train setting, by field name (`max_workers` is --num-workers's MIN-MAX).
SETTINGS: dict[str, Setting] = declared(TrainConfig)
UNSET_ALLOWED = frozenset(
    f.name for f in fields(TrainConfig) if f.default is None and f.name not in RECIPES["tutorial"]
)

# Fields that decide the shapes in a checkpoint: resuming with other values cannot load it. A field
# missing from an older checkpoint's config was at its declared default there (no `conditional`: off).
SHAPE_FIELDS = ("noise_dim", "conditional", "resolution", "channels")
# Their values in a checkpoint written before a field existed (before own images: 28 x 28 grey).
EARLIER_SHAPE = {"resolution": 28, "channels": 1}
