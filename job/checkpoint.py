"""The one checkpoint writer and reader.

A checkpoint is one `state.pt` inside a Ray Train checkpoint folder (`checkpoint_<timestamp>/`).
It holds everything resume needs and nothing that needs pickle: it is read with
`torch.load(weights_only=True)`, because a checkpoint from a bucket is untrusted input.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from job.console import warn
from job.errors import UsageError
from job.storage import Location, resolve_location

STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "checkpoint_"
FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version", "generator", "discriminator", "optimizer_g", "optimizer_d",
    "epoch", "step", "fixed_noise", "rng", "config", "data_fingerprint",
)  # fmt: skip


class CheckpointError(UsageError):
    """A checkpoint that cannot be read safely: damaged, incomplete or not ours."""


def write_checkpoint(folder: Path, state: dict) -> Path:
    """Write `state` into `folder` (a fresh local folder that Ray then uploads)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_FILE
    torch.save(state, path)
    return path


def decode_checkpoint(raw: bytes, source: str) -> dict:
    """Parse checkpoint bytes without running any code from them, and check what they hold."""
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or hostile file fails in many ways; all mean "unusable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {source} cannot be loaded safely ({reason[:200]})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {source} is not a gan-job checkpoint (keys missing)")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {source} has format {state['format_version']}, this version reads {FORMAT_VERSION}")
    return state


def read_checkpoint(folder: Location) -> dict:
    """Load the state of one checkpoint folder."""
    state_file = folder.child(STATE_FILE)
    try:
        raw = state_file.read_bytes()
    except (FileNotFoundError, OSError):
        raise CheckpointError(f"checkpoint {folder.uri} has no readable {STATE_FILE}") from None
    return decode_checkpoint(raw, folder.uri)


def checkpoint_folders(run: Location) -> list[Location]:
    """The run's checkpoint folders, newest first (Ray names them by their timestamp)."""
    names = [n for n in run.list_names(folders_only=True) if n.startswith(CHECKPOINT_PREFIX)]
    return [run.child(n) for n in sorted(names, reverse=True)]


def latest_good_checkpoint(run: Location) -> tuple[Location, dict] | None:
    """The newest checkpoint of a run that loads; a damaged one is skipped with a warning."""
    for folder in checkpoint_folders(run):
        try:
            return folder, read_checkpoint(folder)
        except CheckpointError as err:
            warn(f"skipping damaged checkpoint: {err}")
    return None


def load_from(uri: str, s3_endpoint: str | None = None) -> tuple[Location, dict]:
    """The checkpoint a `--from` names: a checkpoint folder, or a run folder (its latest)."""
    location = resolve_location(uri, s3_endpoint, flag="--from")
    if location.child(STATE_FILE).exists():
        return location, read_checkpoint(location)
    found = latest_good_checkpoint(location)
    if found is None:
        raise UsageError(f"--from {uri} holds no checkpoint; pass a run folder or one of its checkpoint_* folders")
    return found
