"""A job's `LATEST` pointer and its `promotions.jsonl`, updated by compare-and-swap.

`Store.write` replaces an object only if it still has the version token `Store.read` returned, else raises
`PreconditionFailed`; `check_enforced` refuses a store that ignores the condition.
Why: docs/architecture.md#promotion-by-compare-and-swap
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass

from job.errors import UsageError
from job.storage.checkpoint import sha256_hex
from job.storage.location import Location, resolve_location
from job.storage.retry import retried
from job.storage.s3 import s3_client
from job.storage.s3_preflight import check_conditional_writes

LOG_FILE = "promotions.jsonl"


class PreconditionFailed(Exception):
    """The object changed since it was read: another writer won the race."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes as read, with the token a conditional write compares (both None: no object)."""

    data: bytes | None
    token: str | None


def lock_path(location: Location) -> str:
    folder, name = os.path.split(location.path)
    return os.path.join(folder, f".{name}.lock")


def _bucket_key(location: Location) -> tuple[str, str]:
    bucket, _, key = location.path.partition("/")
    return bucket, key


class Store:
    """Whole-object reads with a version token, and writes conditional on it; local files or S3 objects."""

    def __init__(self, s3_endpoint: str | None = None):
        self.s3_endpoint = s3_endpoint
        self._client = None

    def client(self):
        if self._client is None:
            self._client = s3_client(self.s3_endpoint)
        return self._client

    def read(self, location: Location) -> Versioned:
        """The object and its token; `Versioned(None, None)` only when there is none. A read that fails raises
        (`job.storage.retry`): a pointer that cannot be read is never taken as "no pointer yet"."""
        try:
            return retried(
                lambda: self._read_once(location), f"reading {location.uri}", confirm_absent=location.confirm_bucket
            )
        except FileNotFoundError:
            return Versioned(None, None)

    def _read_once(self, location: Location) -> Versioned:
        if location.is_local:
            with open(location.path, "rb") as handle:
                data = handle.read()
            return Versioned(data, sha256_hex(data))
        bucket, key = _bucket_key(location)
        reply = self.client().get_object(Bucket=bucket, Key=key)
        return Versioned(reply["Body"].read(), reply["ETag"])  # body and ETag of one version

    def write(self, location: Location, data: bytes, token: str | None) -> None:
        """Replace the object whole with `data` if it still has `token` (None: if there is still none).

        Raises `PreconditionFailed` when it changed since it was read (also when a retried write had
        landed: the caller reads again and finds its decision); storage failures raise as `Location`'s do.
        """
        retried(lambda: self._write_once(location, data, token), f"writing {location.uri}")

    def _write_once(self, location: Location, data: bytes, token: str | None) -> None:
        if location.is_local:
            os.makedirs(os.path.dirname(location.path), exist_ok=True)
            fd = os.open(lock_path(location), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # held for a compare and a rename: milliseconds
                if self.read(location).token != token:
                    raise PreconditionFailed(location.uri)
                location.write_bytes(data)  # a temporary file renamed over it
            finally:
                os.close(fd)  # releases the lock
            return
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(location)
        condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        try:
            self.client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the condition failed; 409: a concurrent conditional write to the key won (AWS);
            # 404 on If-Match: the object was deleted since it was read.
            if status in (409, 412) or (token is not None and status == 404):
                raise PreconditionFailed(location.uri) from None
            raise


# -- the enforcement probe ---------------------------------------------------------------------

# Run in another process: flock is per open file locally, but some network file systems (NFS)
# emulate it with per-process locks, which a second descriptor in this process would not meet.
_TRY_LOCK = """
import fcntl, sys
try:
    fcntl.flock(open(sys.argv[1], "rb"), fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
"""


def check_enforced(target: Location, s3_endpoint: str | None = None, flag: str = "--target") -> None:
    """Raise a `UsageError` unless the store of `target` enforces what `Store.write` relies on."""
    if not target.is_local:
        check_conditional_writes(target.uri, s3_endpoint, flag)
        return
    # Probed where LATEST's folder is, or would be made: its nearest existing folder is on the same
    # file system, and a refused promotion then leaves no empty folder behind.
    folder = os.path.dirname(target.path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    probe = os.path.join(folder, f".gan-job-lock-probe-{uuid.uuid4().hex}")
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o666)
    advice = (
        "so concurrent promotions could lose one; "
        "keep LATEST on a local disk, an NFSv4 share with locking, or in a bucket"
    )
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            reason = err.strerror or str(err)
            raise UsageError(
                f"{flag} {target.uri}: the file system of {folder} cannot lock files ({reason}), {advice}"
            ) from None
        other = subprocess.run([sys.executable, "-I", "-S", "-c", _TRY_LOCK, probe], capture_output=True, timeout=60)
        if other.returncode == 0:
            raise UsageError(
                f"{flag} {target.uri}: the file system of {folder} does not enforce file locks "
                f"(another process took a lock this one held), {advice}"
            )
        if other.returncode != 3:
            reason = (
                other.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {other.returncode}"]
            )[-1]
            raise UsageError(f"{flag} {target.uri}: the file system of {folder} cannot lock files ({reason}), {advice}")
    finally:
        os.close(fd)
        os.unlink(probe)


# -- LATEST and the log ------------------------------------------------------------------------


def parse_pointer(data: bytes, uri: str, flag: str = "--target") -> dict:
    """LATEST's JSON object; anything else is refused as bad input."""
    try:
        pointer = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        pointer = None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("run"), str):
        raise UsageError(f'{flag} {uri} is not a LATEST pointer (a JSON object with "run"); fix or delete it')
    return pointer


def pointer_bytes(pointer: dict) -> bytes:
    return (json.dumps(pointer, sort_keys=True) + "\n").encode("utf-8")


def log_of(target: Location) -> Location:
    """`promotions.jsonl` beside LATEST."""
    folder_uri, _, _ = target.uri.rstrip("/").rpartition("/")
    folder_path, _, _ = target.path.rstrip("/").rpartition("/")
    return dataclasses.replace(target, uri=folder_uri, path=folder_path).child(LOG_FILE)


def log_entries(data: bytes | None) -> list[dict]:
    """The log's decisions; lines that are not JSON objects (a hand edit) are skipped."""
    entries = []
    for line in (data or b"").decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


@dataclass(frozen=True)
class Snapshot:
    """One read of a job's promotion state: the log, then LATEST (so a LATEST newer than the log is seen)."""

    log: Versioned
    latest: Versioned
    pointer: dict | None  # LATEST parsed; None when there is none yet
    entries: tuple[dict, ...]  # the log's decisions

    def logged(self, decision_id: str) -> dict | None:
        return next((e for e in self.entries if e.get("id") == decision_id), None)

    def find(self, decision_id: str) -> dict | None:
        """The decision with this id if the log or LATEST holds it (a write can land although its reply was lost)."""
        carried = self.carried
        return self.logged(decision_id) or (carried if carried is not None and carried["id"] == decision_id else None)

    @property
    def carried(self) -> dict | None:
        """The decision that made LATEST (None for a pointer written by hand or by an older version)."""
        decision = (self.pointer or {}).get("decision")
        return decision if isinstance(decision, dict) and isinstance(decision.get("id"), str) else None


def read_snapshot(store: Store, target: Location) -> Snapshot:
    log = store.read(log_of(target))
    latest = store.read(target)
    pointer = parse_pointer(latest.data, target.uri) if latest.data is not None else None
    return Snapshot(log, latest, pointer, tuple(log_entries(log.data)))


def append(store: Store, target: Location, snapshot: Snapshot, *decisions: dict) -> None:
    """Append `decisions` to the log as it was in `snapshot`, after the decision LATEST carries if the log lacks it.

    Raises `PreconditionFailed` when the log changed since the snapshot.
    """
    carried = snapshot.carried
    pending = [carried] if carried is not None and snapshot.logged(carried["id"]) is None else []
    pending += [
        d for d in decisions if snapshot.logged(d["id"]) is None and (carried is None or d["id"] != carried["id"])
    ]
    if not pending:
        return
    previous = snapshot.log.data or b""
    if previous and not previous.endswith(b"\n"):
        previous += b"\n"
    lines = "".join(json.dumps(d, sort_keys=True) + "\n" for d in pending).encode("utf-8")
    store.write(log_of(target), previous + lines, snapshot.log.token)


def replace_pointer(store: Store, target: Location, snapshot: Snapshot, pointer: dict) -> None:
    """Move LATEST to `pointer` (which carries its decision), after logging the decision the old LATEST carries.

    Raises `PreconditionFailed` when the log or LATEST changed since the snapshot.
    """
    append(store, target, snapshot)  # the decision about to leave LATEST goes to the log first
    store.write(target, pointer_bytes(pointer), snapshot.latest.token)


# -- reading LATEST ------------------------------------------------------------------------------


def read_pointer(location: Location, flag: str = "--target") -> dict | None:
    """The LATEST pointer at `location`, or None when there is none yet; anything else is refused."""
    if not location.exists():
        return None
    if not location.is_file():
        raise UsageError(
            f"{flag} {location.uri} is a folder; name the pointer object itself, e.g. <storage>/<job>/LATEST"
        )
    return parse_pointer(location.read_bytes(), location.uri, flag)


def resolve_latest(uri: str, s3_endpoint: str | None = None, flag: str = "--from") -> str:
    """The run a LATEST pointer names, once it is a folder under the pointer's storage root; any other location
    (a run or checkpoint folder) as it is."""
    location = resolve_location(uri, s3_endpoint, flag=flag)
    if not location.exists() or not location.is_file():
        return uri
    named = read_pointer(location, flag=flag)["run"]
    try:
        run = resolve_location(named, s3_endpoint, flag=flag)
    except UsageError:
        run = None
    if run is None or not is_under(run, storage_root(location)):
        raise UsageError(
            f"{flag} {uri} names {named!r}, which is not a run under its storage root {storage_root(location).uri}; "
            "a LATEST pointer names only runs beside its job folder: fix or delete the pointer"
        )
    if run.is_file():
        raise UsageError(f"{flag} {uri} names {run.uri}, which is a file, not a run folder; fix or delete the pointer")
    return named


def storage_root(target: Location) -> Location:
    """The storage a pointer `<storage>/<job>/LATEST` belongs to: `<storage>` (at most its bucket)."""
    uri, path = target.uri, target.path
    for _ in range(2):
        if "/" in path.strip("/"):
            uri, path = uri.rstrip("/").rpartition("/")[0], path.rstrip("/").rpartition("/")[0]
    return dataclasses.replace(target, uri=uri, path=path)


def is_under(run: Location, root: Location) -> bool:
    """Whether `run` is inside `root`, in the same store."""
    if run.is_local != root.is_local:
        return False
    inner, outer = run.path.rstrip("/"), root.path.rstrip("/")
    return inner != outer and inner.startswith(outer + "/")
