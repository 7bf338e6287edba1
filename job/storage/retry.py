"""Storage errors sorted into absent, retried and refused, and the one retry loop for every read,
list, head and whole-object write that `Location`, the pointer store and the bucket data make.

Why: docs/architecture.md#storage-retries
"""

from __future__ import annotations

import errno
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from job.console import warn
from job.errors import StorageError, StorageFailed, StorageRefused

T = TypeVar("T")

ABSENT, RETRY, REFUSED, FAILED = "absent", "retry", "refused", "failed"

# Environment overrides of the bounds (seconds), for operators and for the tests' short outages.
RETRY_BUDGET_ENV = "GAN_JOB_STORAGE_RETRY_S"
REQUEST_TIMEOUT_ENV = "GAN_JOB_STORAGE_TIMEOUT_S"


@dataclass(frozen=True)
class RetryBounds:
    """How long one storage operation keeps trying: whichever bound comes first ends it."""

    attempts: int = 10  # attempts in all, the first included
    budget_s: float = 120.0  # no new attempt starts later than this after the first began
    first_backoff_s: float = 0.5  # the wait before the second attempt (doubling after each, then jittered)
    max_backoff_s: float = 20.0  # the longest single wait


DEFAULT_BOUNDS = RetryBounds()
DEFAULT_REQUEST_TIMEOUT_S = 60.0  # one request's read timeout: a checkpoint part upload may take a while
CONNECT_TIMEOUT_S = 5.0  # fail fast on a wrong endpoint


def _seconds_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise StorageRefused(f"{name}={raw!r} is not a number of seconds in (0, 3600]; fix or unset it")
    return value


def retry_bounds() -> RetryBounds:
    """The bounds in force: `DEFAULT_BOUNDS`, with the budget from GAN_JOB_STORAGE_RETRY_S when set."""
    budget_s = _seconds_from_env(RETRY_BUDGET_ENV, DEFAULT_BOUNDS.budget_s)
    first_backoff_s = min(DEFAULT_BOUNDS.first_backoff_s, budget_s / 10)  # a short budget still gets a few attempts
    return RetryBounds(DEFAULT_BOUNDS.attempts, budget_s, first_backoff_s, DEFAULT_BOUNDS.max_backoff_s)


def request_timeout_s() -> float:
    """One request's read timeout: DEFAULT_REQUEST_TIMEOUT_S, or GAN_JOB_STORAGE_TIMEOUT_S when set."""
    return _seconds_from_env(REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT_S)


def longest_wait_s(bounds: RetryBounds, timeout_s: float) -> float:
    """The longest one operation can take before it gives up: an attempt may start at the end of the budget."""
    return bounds.budget_s + CONNECT_TIMEOUT_S + timeout_s


# -- classes -----------------------------------------------------------------------------------

# AWS error names as pyarrow (the AWS SDK for C++) prints them, and S3 error codes as botocore gives them.
_REFUSED_AWS = re.compile(
    r"AWS Error (ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|NO_SUCH_BUCKET"
    r"|INVALID_TOKEN|EXPIRED_TOKEN"
    r"|MISSING_AUTHENTICATION_TOKEN|UNRECOGNIZED_CLIENT)\b|\(HTTP status 40[13]\)"
)
_REFUSED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "AccountProblem",
    "403",
    "401",
}
_ABSENT_CODES = {"NoSuchKey", "404", "NotFound"}
# A file where a folder is expected, or the other way round, is a wrong location: never absent, never retried.
_REFUSED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR}
_FAILED_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # retrying a full disk within seconds helps nobody
_ABSENT_ERRNOS = {errno.ENOENT}
# pyarrow raises some of those without an errno, naming them only in its message.
_REFUSED_WORDS = re.compile(r"\bis a directory\b|\bnot a directory\b|\bis not a file\b", re.IGNORECASE)


def classify(err: BaseException, unreachable_is_refused: bool = False) -> str | None:
    """ABSENT, RETRY, REFUSED or FAILED for a storage error;
    None for anything that is not one (a bug: not ours to retry).

    `unreachable_is_refused`: a connection that cannot even be made (nothing listens, no such host)
    is taken as a wrong endpoint and refused at once, as the preflights do, rather than retried.
    """
    # botocore's ConnectionError covers a refused connection, an unknown host and a connect timeout: never a reset
    # or a read timeout.
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
    from botocore.exceptions import ConnectionError as UnreachableError

    if isinstance(err, StorageError):  # an inner operation's own verdict (its retries are spent): not retried again
        return None
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code") or "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or code in _REFUSED_CODES or status in (401, 403):
            return REFUSED
        if code in _ABSENT_CODES or status == 404:
            return ABSENT
        return RETRY  # SlowDown, InternalError, 500/502/503/504, 429, and anything unnamed
    if isinstance(err, BotoCoreError):
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return REFUSED
        if unreachable_is_refused and isinstance(err, UnreachableError):
            return REFUSED
        return RETRY  # resets, closed connections, read and connect timeouts
    if not isinstance(err, OSError):
        return None
    if err.errno in _REFUSED_ERRNOS or isinstance(err, (IsADirectoryError, NotADirectoryError)):
        return REFUSED
    if err.errno in _ABSENT_ERRNOS or isinstance(err, FileNotFoundError):
        return ABSENT
    if err.errno in _FAILED_ERRNOS:
        return FAILED
    message = str(err)
    if _REFUSED_AWS.search(message) or _REFUSED_WORDS.search(message):
        return REFUSED
    if unreachable_is_refused and re.search(r"curlCode: (6|7),", message):  # no such host; nothing listens
        return REFUSED
    return RETRY  # throttling, server errors, resets, timeouts: pyarrow names them in its message


def reason_of(err: BaseException) -> str:
    """The error on one line, short enough for a console."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# -- the loop ------------------------------------------------------------------------------------


def retried(
    operation: Callable[[], T],  # one attempt: returns the result or raises what the client raised
    what: str,  # the operation and the location, for messages: "reading s3://bucket/run/state.pt"
    # called before "absent" is believed (raises if the bucket is gone)
    confirm_absent: Callable[[], None] | None = None,
    unreachable_is_refused: bool = False,  # see `classify`
    # raise a refusal as the client raised it (for a caller that explains it), not as StorageRefused
    keep_refusals: bool = False,
) -> T:
    """`operation()`, retried within `retry_bounds()` while it fails transiently.

    Absent: `FileNotFoundError`. Refused: `StorageRefused` at once. Failed, or out of retries:
    `StorageFailed`. Errors that are not storage errors pass through untouched. A failed attempt
    changes nothing: reads only read, and writes replace an object whole or not at all.
    """
    bounds = retry_bounds()
    started_s = time.monotonic()
    for attempt in range(1, bounds.attempts + 1):
        try:
            return operation()
        except Exception as err:  # noqa: BLE001 (sorted right below; what is not ours is raised again)
            kind = classify(err, unreachable_is_refused)
            if kind is None:
                raise
            if kind == ABSENT:
                if confirm_absent is not None:
                    confirm_absent()
                if isinstance(err, FileNotFoundError):
                    raise
                raise FileNotFoundError(errno.ENOENT, f"{what}: not found") from None
            if kind == REFUSED:
                if keep_refusals:
                    raise
                raise StorageRefused(
                    f"{what} was refused ({reason_of(err)}); "
                    "check the location, the S3 credentials and endpoint, and permissions"
                ) from None
            if kind == FAILED:
                raise StorageFailed(f"{what} failed ({reason_of(err)})") from None
            elapsed_s = time.monotonic() - started_s
            ceiling_s = min(bounds.max_backoff_s, bounds.first_backoff_s * 2 ** (attempt - 1))
            wait_s = ceiling_s / 2 + random.uniform(0, ceiling_s / 2)  # jitter: clients that failed together spread out
            if attempt == bounds.attempts or elapsed_s + wait_s > bounds.budget_s:
                raise StorageFailed(
                    f"{what} failed after {attempt} attempt{'s' if attempt > 1 else ''} "
                    f"in {elapsed_s:.1f} s ({reason_of(err)})",
                ) from None
            if attempt == 1:
                warn(f"{what} failed ({reason_of(err)}); retrying for up to {bounds.budget_s:.0f} s")
            time.sleep(wait_s)
    raise AssertionError("unreachable: the last attempt returns or raises")
