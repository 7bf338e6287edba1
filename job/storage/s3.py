"""The one S3 client factory: pyarrow for run files, boto3 for what pyarrow does not do.

The endpoint comes from `--s3-endpoint` or `AWS_ENDPOINT_URL` and is passed to pyarrow
explicitly, since pyarrow does not reliably read it from the environment. Credentials come from
the standard AWS variables or the pod's identity and are never logged or stored.

Retries: every client here makes one attempt per call, and `job.storage.retry` retries around
them, bounded in attempts and seconds, so attempts never multiply. That holds for Ray Train's own
calls too (its controller's bucket check, its checkpoint records): `job.storage.ray_filesystem`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from job.settings import check_endpoint_url
from job.storage.retry import CONNECT_TIMEOUT_S, request_timeout_s

if TYPE_CHECKING:
    import pyarrow.fs  # lazy: pyarrow is heavy and only storage work needs it

ONE_ATTEMPT = 1  # under job.storage.retry's loop: the clients themselves never retry


def endpoint_url(explicit: str | None = None) -> str | None:
    """The S3 endpoint: the flag, else `AWS_ENDPOINT_URL`, else None (AWS's own endpoints)."""
    url = explicit or os.environ.get("AWS_ENDPOINT_URL") or None
    if url is not None:
        check_endpoint_url(url, "--s3-endpoint" if explicit else "AWS_ENDPOINT_URL")
    return url


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem(explicit_endpoint: str | None = None) -> "pyarrow.fs.S3FileSystem":
    """A pyarrow S3 filesystem for the configured endpoint and credentials, making one attempt per call.

    (Its `retry_strategy` would not survive pickling into Ray's processes anyway: pyarrow leaves it out.)
    """
    import pyarrow.fs

    url = endpoint_url(explicit_endpoint)
    options: dict = dict(
        region=region(),
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=request_timeout_s(),
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=ONE_ATTEMPT),
    )
    if url is not None:
        parsed = urlparse(url)
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pyarrow.fs.S3FileSystem(**options)


def s3_client(
    explicit_endpoint: str | None = None, max_attempts: int = ONE_ATTEMPT, read_timeout_s: float | None = None
):
    """A boto3 S3 client (typed loosely to keep boto3 lazy) for the same endpoint; one attempt a call unless told
    otherwise, and the request timeout in force unless `read_timeout_s` is given."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=request_timeout_s() if read_timeout_s is None else read_timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
    )
    # A fresh session reads the credentials now, not once per process (boto3's default caches them).
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url(explicit_endpoint), region_name=region(), config=config
    )
