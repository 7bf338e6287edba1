"""`sweep.json`: what a sweep was started with. The same command again resumes the sweep; other flags are refused."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from job.errors import UsageError, flag_name
from job.storage.location import Location

SPEC_FILE = "sweep.json"
SPEC_FORMAT = 1
# Fields of the base configuration that do not change what a sweep computes: where the promotion goes is decided
# per command, and the S3 endpoint is how this machine reaches the same storage.
NOT_COMPARED = ("s3_endpoint", "create_bucket", "placement_timeout")


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
        own = [(name, stored.get(name), value) for name, value in asdict(self).items()
               if name not in ("version", "base", "sweep")]  # fmt: skip
        train = [(name, base.get(name), value) for name, value in self.base.items() if name not in NOT_COMPARED]
        return [f"{flag_name(name)} {_shown(old)} (sweep.json) vs {_shown(new)} (now)"
                for name, old, new in own + train if old != new]  # fmt: skip


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
