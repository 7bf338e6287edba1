"""The one checkpoint writer and reader.

A checkpoint is one `state.pt` inside a Ray Train checkpoint folder (`checkpoint_<timestamp>/`),
next to `state.pt.sha256`, its digest. It holds everything resume needs and nothing that needs
pickle: it is read with `torch.load(weights_only=True)`, because a checkpoint from a bucket is
untrusted input. The digest catches what `torch.load` does not: it checks no CRC, so a damaged
byte in a tensor loads silently as a wrong weight; and a folder without both files is one whose
upload never finished. (Format 1 checkpoints, written before digests, still load, unverified.)
This module handles bytes; `job.storage.checkpoint_schema` says what the dict inside holds, and
`job.runtime.state.TrainingState` builds and consumes it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from job.console import warn
from job.errors import UsageError
from job.storage.checkpoint_schema import CheckpointError, check_contents
from job.storage.location import Location, resolve_location

STATE_FILE = "state.pt"
DIGEST_FILE = "state.pt.sha256"  # written after STATE_FILE, so a half-written folder lacks it
CHECKPOINT_PREFIX = "checkpoint_"


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint folder that lacks a file: its upload was cut off (nothing in it is damaged)."""


def sha256_hex(raw: bytes) -> str:
    """The SHA-256 of `raw` as 64 hex digits: the job's one digest of bytes (checkpoints, LATEST's local token)."""
    return hashlib.sha256(raw).hexdigest()


def write_checkpoint(folder: Path, state: dict) -> Path:
    """Write `state` and its digest into `folder` (a fresh local folder that Ray then uploads)."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = folder / STATE_FILE
    path.write_bytes(buffer.getvalue())
    (folder / DIGEST_FILE).write_text(f"{sha256_hex(buffer.getvalue())}  {STATE_FILE}\n")
    return path


def upload_checkpoint(local_folder: Path, folder: Location) -> None:
    """Copy a written checkpoint into storage file by file, the digest last; raise if any write fails.

    Each file is one whole-object write that raises when it fails, so a folder in storage is
    complete exactly when its digest is there. (pyarrow's `copy_files`, Ray Train's default
    upload, logs and drops the error of a part upload that fails, which let an S3 outage
    register a checkpoint without its `state.pt`.)
    """
    names = [p.name for p in local_folder.iterdir() if p.is_file()]
    for name in sorted(names, key=lambda n: (n == DIGEST_FILE, n)):
        folder.child(name).write_bytes((local_folder / name).read_bytes())


def verify_digest(raw: bytes, digest_text: str, source: str) -> None:
    """Raise a `CheckpointError` unless `raw` is exactly the bytes the writer hashed."""
    expected = digest_text.strip().split(" ", 1)[0].lower()
    if sha256_hex(raw) != expected:
        raise CheckpointError(
            f"checkpoint {source} is damaged: {STATE_FILE} ({len(raw)} bytes) does not match its {DIGEST_FILE}"
        )


def decode_checkpoint(raw: bytes, source: str) -> dict:
    """Parse checkpoint bytes without running any code from them, and check what they hold."""
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or hostile file fails in many ways; all mean "unusable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {source} cannot be loaded safely ({reason[:200]})") from None
    return check_contents(state, source)


def _read_file(folder: Location, name: str) -> bytes | None:
    """The file's bytes; None only when it is not there. A read that fails raises (`job.storage.retry`): a
    checkpoint that cannot be read right now is not an incomplete one, and must not be skipped as one."""
    try:
        return folder.child(name).read_bytes()
    except FileNotFoundError:
        return None


def read_checkpoint(folder: Location) -> dict:
    """Load the state of one checkpoint folder, after checking that it is whole."""
    raw, digest = _read_file(folder, STATE_FILE), _read_file(folder, DIGEST_FILE)
    if raw is None:
        raise IncompleteCheckpointError(f"checkpoint {folder.uri} is incomplete: it has no readable {STATE_FILE}")
    if digest is not None:
        verify_digest(raw, digest.decode("utf-8", "replace"), folder.uri)
    state = decode_checkpoint(raw, folder.uri)
    if digest is None:
        if state["format_version"] >= 2:  # the writer made a digest: its upload was cut off before it
            raise IncompleteCheckpointError(f"checkpoint {folder.uri} is incomplete: it has no readable {DIGEST_FILE}")
        warn(f"checkpoint {folder.uri} predates digests (format 1): loaded without an integrity check")
    return state


def checkpoint_folders(run: Location) -> list[Location]:
    """The run's checkpoint folders, newest first (Ray names them by their timestamp)."""
    names = [n for n in run.list_names(folders_only=True) if n.startswith(CHECKPOINT_PREFIX)]
    return [run.child(n) for n in sorted(names, reverse=True)]


def latest_good_checkpoint(run: Location, refused: list[CheckpointError] | None = None) -> tuple[Location, dict] | None:
    """The newest checkpoint of a run that loads; the ones skipped on the way are added to `refused`."""
    for folder in checkpoint_folders(run):
        try:
            return folder, read_checkpoint(folder)
        except CheckpointError as err:
            if refused is not None:
                refused.append(err)
    return None


def latest_checkpoint_or_refuse(run: Location, what: str) -> tuple[Location, dict] | None:
    """The run's latest good checkpoint, each newer one it skips warned about; None for a run with none; an error,
    and no warning beside it, when all are damaged.

    Starting over beside damaged checkpoints would overwrite the run's history, so that is
    refused. Folders that are only incomplete (an upload cut off) do not count: the run never
    took them as a checkpoint.
    """
    refused: list[CheckpointError] = []
    found = latest_good_checkpoint(run, refused)
    damaged = [err for err in refused if not isinstance(err, IncompleteCheckpointError)]
    if found is None and damaged:
        raise CheckpointError(
            f"{what} {run.uri}: no checkpoint loads safely ({damaged[0]}); "
            "delete the damaged checkpoint_* folders to start over, or use another run"
        )
    for err in refused:
        warn(f"skipping {'incomplete' if isinstance(err, IncompleteCheckpointError) else 'damaged'} checkpoint: {err}")
    return found


def load_from(uri: str, s3_endpoint: str | None = None, flag: str = "--from") -> tuple[Location, dict]:
    """The checkpoint a `--from` (or `flag`) names: a checkpoint folder, or a run folder (its latest)."""
    location = resolve_location(uri, s3_endpoint, flag=flag)
    if location.child(STATE_FILE).exists():
        return location, read_checkpoint(location)
    found = latest_checkpoint_or_refuse(location, flag)
    if found is None:
        raise UsageError(f"{flag} {uri} holds no checkpoint; pass a run folder or one of its checkpoint_* folders")
    return found
