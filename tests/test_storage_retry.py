"""Storage errors are sorted into absent, retried, refused and failed, and the retry loop keeps its bounds.

pyarrow reports every S3 error as a plain `OSError` whose message names the AWS error, so the
messages below are the ones pyarrow 2x printed against the loopback S3 server (wrong keys) and
`tests/faultproxy.py` (resets, 503 SlowDown, 500 InternalError, stalls).
"""

from __future__ import annotations

import errno
import time

import pytest
from botocore.exceptions import (
    ClientError, ConnectionClosedError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError,
)  # fmt: skip

from job.errors import StorageFailed, StorageRefused
from job.storage.retry import (
    ABSENT,
    FAILED,
    REFUSED,
    RETRY,
    RetryBounds,
    classify,
    longest_wait_s,
    retried,
    retry_bounds,
)

PYARROW = "When reading information for key 'run/a' in bucket 'runs': AWS Error {} during HeadObject operation: {}"
PYARROW_MESSAGES = {
    "reset": (
        PYARROW.format("NETWORK_CONNECTION", "curlCode: 52, Server returned nothing (no headers, no data)"),
        RETRY,
    ),
    "503 on a HEAD": (PYARROW.format("UNKNOWN (HTTP status 503)", "No response body."), RETRY),
    "503 SlowDown": (PYARROW.format("SLOW_DOWN", "Please reduce your request rate."), RETRY),
    "500 on a HEAD": (PYARROW.format("UNKNOWN (HTTP status 500)", "No response body."), RETRY),
    "500 InternalError": (PYARROW.format("INTERNAL_FAILURE", "We encountered an internal error."), RETRY),
    "502": (PYARROW.format("UNKNOWN (HTTP status 502)", "No response body."), RETRY),
    "504": (PYARROW.format("UNKNOWN (HTTP status 504)", "No response body."), RETRY),
    "429": (PYARROW.format("UNKNOWN (HTTP status 429)", "No response body."), RETRY),
    "stall": (PYARROW.format("NETWORK_CONNECTION", "curlCode: 28, Timeout was reached"), RETRY),
    "nothing listens": (PYARROW.format("NETWORK_CONNECTION", "curlCode: 7, Could not connect to server"), RETRY),
    "403 on a HEAD": (PYARROW.format("ACCESS_DENIED", "No response body."), REFUSED),
    "InvalidAccessKeyId": (
        PYARROW.format("INVALID_ACCESS_KEY_ID", "The AWS Access Key Id you provided does not exist"),
        REFUSED,
    ),
    "SignatureDoesNotMatch": (
        PYARROW.format("SIGNATURE_DOES_NOT_MATCH", "The request signature we calculated"),
        REFUSED,
    ),
    "NoSuchBucket": (PYARROW.format("NO_SUCH_BUCKET", "The specified bucket does not exist"), REFUSED),
    "403 unnamed": (PYARROW.format("UNKNOWN (HTTP status 403)", "No response body."), REFUSED),
}


@pytest.mark.parametrize("case", sorted(PYARROW_MESSAGES))
def test_a_pyarrow_error_is_classed_by_its_message(case):
    message, expected = PYARROW_MESSAGES[case]
    assert classify(OSError(message)) == expected


def test_pyarrows_not_found_is_absent():
    assert classify(FileNotFoundError(errno.ENOENT, "Path does not exist 'runs/run/a'")) == ABSENT


def test_an_endpoint_where_nothing_listens_is_refused_where_the_caller_says_so():
    message = PYARROW_MESSAGES["nothing listens"][0]
    assert classify(OSError(message), unreachable_is_refused=True) == REFUSED
    assert classify(OSError(PYARROW_MESSAGES["reset"][0]), unreachable_is_refused=True) == RETRY


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(
    "code, status, expected",
    [
        ("NoSuchKey", 404, ABSENT), ("404", 404, ABSENT),
        ("SlowDown", 503, RETRY), ("InternalError", 500, RETRY), ("BadGateway", 502, RETRY),
        ("GatewayTimeout", 504, RETRY), ("TooManyRequests", 429, RETRY), ("RequestTimeout", 400, RETRY),
        ("AccessDenied", 403, REFUSED), ("InvalidAccessKeyId", 403, REFUSED), ("SignatureDoesNotMatch", 403, REFUSED),
        ("NoSuchBucket", 404, REFUSED), ("ExpiredToken", 400, REFUSED),
    ],
)  # fmt: skip
def test_a_botocore_client_error_is_classed_by_its_code(code, status, expected):
    assert classify(_client_error(code, status)) == expected


def test_botocore_connection_errors():
    assert classify(ConnectionClosedError(endpoint_url="http://x")) == RETRY  # a reset
    assert classify(ReadTimeoutError(endpoint_url="http://x")) == RETRY  # a stall
    assert (
        classify(EndpointConnectionError(endpoint_url="http://x")) == RETRY
    )  # an outage, once the endpoint was reached
    assert classify(EndpointConnectionError(endpoint_url="http://x"), unreachable_is_refused=True) == REFUSED
    assert classify(NoCredentialsError()) == REFUSED


@pytest.mark.parametrize(
    "number, expected",
    [
        (errno.ENOENT, ABSENT), (errno.EACCES, REFUSED), (errno.EROFS, REFUSED), (errno.EPERM, REFUSED),
        (errno.ENOSPC, FAILED), (errno.EDQUOT, FAILED), (errno.EIO, RETRY), (errno.ESTALE, RETRY),
    ],
)  # fmt: skip
def test_a_local_error_is_classed_by_its_errno(number, expected):
    assert classify(OSError(number, "x")) == expected


def test_what_is_no_storage_error_is_not_classed():
    assert classify(ValueError("a bug")) is None


# The loop -------------------------------------------------------------------------------------


class Flaky:
    """Fails with `error` for its first `failures` calls, then returns "ok"."""

    def __init__(self, error: BaseException, failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


SLOWDOWN = OSError(PYARROW_MESSAGES["503 SlowDown"][0])


def test_a_transient_failure_inside_the_budget_is_retried_until_it_passes(monkeypatch, capsys):
    monkeypatch.setenv("GAN_JOB_STORAGE_RETRY_S", "5")
    flaky = Flaky(SLOWDOWN, failures=2)
    assert retried(flaky, "reading s3://runs/a") == "ok"
    assert flaky.calls == 3
    assert capsys.readouterr().err.count("retrying") == 1  # one warning per operation, not one per attempt


def test_a_transient_failure_past_the_budget_fails_in_one_line_naming_the_location_and_the_error(monkeypatch):
    monkeypatch.setenv("GAN_JOB_STORAGE_RETRY_S", "0.5")
    flaky = Flaky(SLOWDOWN, failures=10**6)
    started_s = time.monotonic()
    with pytest.raises(StorageFailed) as caught:
        retried(flaky, "reading s3://runs/a")
    took_s = time.monotonic() - started_s
    message = str(caught.value)
    assert "\n" not in message and "reading s3://runs/a failed after" in message and "SLOW_DOWN" in message
    assert 1 < flaky.calls <= retry_bounds().attempts
    assert took_s <= 0.5 + 0.1  # no attempt starts past the budget (a guard: the calls themselves take no time)


def test_the_attempts_are_bounded_too(monkeypatch):
    monkeypatch.setattr("job.storage.retry.DEFAULT_BOUNDS", RetryBounds(attempts=3, budget_s=60, first_backoff_s=0.01))
    flaky = Flaky(SLOWDOWN, failures=10**6)
    with pytest.raises(StorageFailed, match="after 3 attempts"):
        retried(flaky, "reading s3://runs/a")
    assert flaky.calls == 3


@pytest.mark.parametrize(
    "error", [OSError(PYARROW_MESSAGES["403 on a HEAD"][0]), OSError(errno.EACCES, "Permission denied")]
)
def test_a_refusal_fails_at_once_without_a_retry(error):
    flaky = Flaky(error, failures=1)
    with pytest.raises(StorageRefused, match="reading s3://runs/a was refused"):
        retried(flaky, "reading s3://runs/a")
    assert flaky.calls == 1


def test_a_full_disk_fails_at_once_saying_so():
    flaky = Flaky(OSError(errno.ENOSPC, "No space left on device"), failures=1)
    with pytest.raises(StorageFailed, match="No space left on device"):
        retried(flaky, "writing /runs/a")
    assert flaky.calls == 1


def test_absent_is_believed_only_after_the_caller_confirmed_it():
    confirmed = []
    with pytest.raises(FileNotFoundError):
        retried(
            Flaky(_client_error("NoSuchKey", 404), failures=1),
            "reading s3://runs/a",
            confirm_absent=lambda: confirmed.append(1),
        )
    assert confirmed == [1]


def test_a_bug_is_raised_as_it_is():
    with pytest.raises(ZeroDivisionError):
        retried(lambda: 1 / 0, "reading s3://runs/a")


def test_the_bounds_and_the_longest_wait_are_declared():
    bounds = retry_bounds()
    assert (bounds.attempts, bounds.budget_s) == (10, 120.0)
    assert longest_wait_s(bounds, 60.0) == 185.0  # an attempt may start at 120 s: 5 s to connect, 60 s to answer


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "ten", "4000"])
def test_a_bad_bound_in_the_environment_is_refused_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("GAN_JOB_STORAGE_RETRY_S", raw)
    with pytest.raises(StorageRefused, match="GAN_JOB_STORAGE_RETRY_S"):
        retry_bounds()
