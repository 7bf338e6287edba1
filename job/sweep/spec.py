"""A sweep's own flags, checked, and `sweep.json`: what a sweep was started with. The same command again resumes
the sweep; other flags are refused."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import metadata

from job.config import TrainConfig
from job.errors import UsageError, flag_name
from job.promotion.evaluation import DEFAULT_NUM
from job.settings import EVAL_NUM
from job.storage.location import Location
from job.sweep.space import MAX_TRIALS, Dimension, corner_configs, parse_space, trial_count

SPEC_FILE = "sweep.json"
SPEC_FORMAT = 1
# Fields of the base configuration that do not change what a sweep computes: where the promotion goes is decided
# per command, and the S3 endpoint is how this machine reaches the same storage.
NOT_COMPARED = ("s3_endpoint", "create_bucket", "placement_timeout")


@dataclass(frozen=True)
class SweepArgs:
    """The sweep's own flags (the base configuration is a TrainConfig)."""

    sweep: str
    space: list[str]
    trials: int = 1
    scheduler: str = "asha"
    max_concurrent: int = 2
    perturbation_interval: int = 1
    final_eval_num: int = DEFAULT_NUM  # evaluate's and promote's: the winner's eval.json is the one promote reuses


def check_sweep(args: SweepArgs, config: TrainConfig) -> tuple[list[Dimension], list[TrainConfig]]:
    """Every check of the sweep's flags that needs no storage and no Ray; the parsed space, and the base
    configuration with each of its corner values (`job.sweep.space.corner_configs`)."""
    try:
        config.replace(run_name=args.sweep)  # the sweep's folder: the rules of a run's name
    except UsageError:
        raise UsageError(
            f"--sweep {args.sweep!r} is not a valid folder or key name; use letters, digits, '.', '_' or '-'"
        ) from None
    dimensions = parse_space(args.space, args.scheduler)
    searched_data = next((d for d in dimensions if d.name == "data"), None)
    if searched_data is not None and config.data_dir is not None:
        raise UsageError(
            f"--space {searched_data.text!r} with --data-dir: every trial would read the same files, "
            "whatever its dataset; drop --data-dir, or search one dataset"
        )
    variants = corner_configs(config, dimensions)
    trials = trial_count(dimensions, args.trials)
    if trials > MAX_TRIALS:
        raise UsageError(
            f"--space {' '.join(args.space)} with --trials {args.trials} makes {trials:,} trials, more than the "
            f"{MAX_TRIALS:,} a sweep runs; search fewer grid values or fewer --trials"
        )
    if args.scheduler == "pbt" and args.perturbation_interval >= config.epochs:
        raise UsageError(
            f"--perturbation-interval {args.perturbation_interval} leaves --epochs {config.epochs} one segment, so "
            "PBT could never exploit; pass a smaller interval or more epochs"
        )
    if args.scheduler != "pbt" and args.perturbation_interval != 1:
        raise UsageError("--perturbation-interval is for --scheduler pbt; drop it")
    EVAL_NUM.check("--final-eval-num", args.final_eval_num)
    return dimensions, variants


@dataclass(frozen=True)
class SweepSpec:
    """A sweep's flags: `train`'s (the base configuration) and the sweep's own."""

    sweep: str
    base: dict  # TrainConfig.to_dict() as given, before placement fills CPUs per worker; no run name
    space: list  # the --space texts, in order
    trials: int
    scheduler: str
    max_concurrent: int
    perturbation_interval: int
    final_eval_num: int
    version: str  # gan-job's, for the reader; not compared

    def to_json(self) -> str:
        return json.dumps({"format": SPEC_FORMAT, **asdict(self)}, indent=2, sort_keys=True) + "\n"

    def differences(self, stored: dict) -> list[str]:
        """Each flag whose value differs from `stored` (a sweep.json), as `--flag OLD (sweep.json) vs NEW (now)`."""
        base = stored.get("base") or {}
        own = [
            (name, stored.get(name), value)
            for name, value in asdict(self).items()
            if name not in ("version", "base", "sweep")
        ]
        train = [(name, base.get(name), value) for name, value in self.base.items() if name not in NOT_COMPARED]
        return [
            f"{flag_name(name)} {_shown(old)} (sweep.json) vs {_shown(new)} (now)"
            for name, old, new in own + train
            if old != new
        ]


def spec_of(args: SweepArgs, config: TrainConfig) -> SweepSpec:
    """The sweep.json of a sweep started with these flags: the base configuration as given (before placement fills
    CPUs per worker), without its run name."""
    base = config.to_dict()
    base.pop("run_name", None)
    return SweepSpec(
        args.sweep,
        base,
        list(args.space),
        args.trials,
        args.scheduler,
        args.max_concurrent,
        args.perturbation_interval,
        args.final_eval_num,
        package_version(),
    )


def package_version() -> str:
    try:
        return metadata.version("gan-job")
    except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH
        return "unknown"


def _shown(value: object) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "(none)"
    return "(unset)" if value is None else str(value)


# What each field of a sweep.json must be for this version to compare it with a command line.
FIELD_TYPES = {
    "format": int,
    "sweep": str,
    "base": dict,
    "space": list,
    "trials": int,
    "scheduler": str,
    "max_concurrent": int,
    "perturbation_interval": int,
    "final_eval_num": int,
}


def read_spec(folder: Location) -> dict | None:
    """The stored sweep.json; None only when there is none (a read that fails raises: `job.storage.retry`). One
    that is not what this project writes (not UTF-8 JSON, a field of another type) is refused in one line."""
    source = folder.child(SPEC_FILE)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        return None
    try:
        stored = json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        stored = None
    well_formed = isinstance(stored, dict) and all(
        isinstance(stored.get(name), kind) and not isinstance(stored.get(name), bool)
        for name, kind in FIELD_TYPES.items()
    )
    if not well_formed or stored["format"] != SPEC_FORMAT or not all(isinstance(t, str) for t in stored["space"]):
        raise UsageError(f"{source.uri} is not a sweep.json this version reads; fix or move it, or use another --sweep")
    return stored


def check_same(spec: SweepSpec, stored: dict) -> None:
    """Refuse to resume a sweep with other flags than it was started with."""
    differing = spec.differences(stored)
    if differing:
        raise UsageError(
            f"--sweep {spec.sweep} was started with other flags: {'; '.join(differing)}; "
            "run it with the flags of its sweep.json to resume it, or use a new --sweep"
        )
