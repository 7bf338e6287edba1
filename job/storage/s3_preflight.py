"""Before any worker starts: reach the endpoint, find the bucket, write and delete a marker.

Each way it can go wrong ends in its own one-line error: in seconds for what the user must fix
(an endpoint where nothing answers, refused credentials, a missing bucket), after the bounded
retries of `job.storage.retry` for what passes (throttling, server errors, resets, timeouts).
Messages name the endpoint and bucket, never a credential.
"""

from __future__ import annotations

import uuid
from typing import Callable, TypeVar

from job.errors import StorageFailed, UsageError
from job.storage.location import split_s3_uri
from job.storage.retry import retried
from job.storage.s3 import endpoint_url, s3_client

T = TypeVar("T")

PREFLIGHT_READ_TIMEOUT_S = 10  # a probe is a few bytes


def _explain(err: Exception, where: str, bucket: str, flag: str) -> UsageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return UsageError(
            f"{flag}: no S3 credentials found for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(err, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        return UsageError(f"{flag}: cannot reach the S3 endpoint {where}; check AWS_ENDPOINT_URL or --s3-endpoint")
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket") or status == 404:
            fix = "create it or pass --create-bucket" if flag == "--storage" else "create it, or check the bucket name"
            return UsageError(f"{flag}: bucket {bucket!r} does not exist at {where}; {fix}")
        if (
            code
            in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken")
            or status == 403
        ):
            return UsageError(
                f"{flag}: the S3 credentials were refused for bucket {bucket!r} at {where} ({code or status}); "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return UsageError(f"{flag}: S3 error {code or status} for bucket {bucket!r} at {where}")
    return UsageError(f"{flag}: S3 check of bucket {bucket!r} at {where} failed ({type(err).__name__})")


def _call(operation: Callable[[], T], what: str) -> T:
    """One preflight request: retried while it fails transiently;
    what the user must fix raised as the client raised it."""
    return retried(operation, what, unreachable_is_refused=True, keep_refusals=True)


def check_bucket(
    uri: str, endpoint: str | None, flag: str = "--storage", create: bool = False, write: bool = True
) -> None:
    """Raise a `UsageError` unless the bucket of `uri` is reachable (and writable when `write`); `StorageFailed`
    when the store keeps failing past the retry bounds."""
    bucket, prefix = split_s3_uri(uri, flag)
    where = endpoint_url(endpoint) or "AWS S3"
    client = s3_client(endpoint, read_timeout_s=PREFLIGHT_READ_TIMEOUT_S)
    try:
        if not _bucket_exists(client, bucket):
            if not create:
                raise _explain(_no_such_bucket(), where, bucket, flag)
            _call(lambda: client.create_bucket(Bucket=bucket), f"creating bucket s3://{bucket}")
        if write:
            marker = f"{prefix}/.gan-job-preflight-{uuid.uuid4().hex}".lstrip("/")
            _call(lambda: client.put_object(Bucket=bucket, Key=marker, Body=b""), f"writing s3://{bucket}/{marker}")
            _call(lambda: client.delete_object(Bucket=bucket, Key=marker), f"deleting s3://{bucket}/{marker}")
    except (UsageError, StorageFailed):
        raise
    except Exception as err:
        raise _explain(err, where, bucket, flag) from None


def check_readable(uri: str, endpoint: str | None, flag: str) -> None:
    """For a command that only reads `uri`: a wrong endpoint, refused credentials or a missing bucket fail in
    seconds, as `train`'s preflight does, not after the retries meant for an outage. Local folders pass."""
    if uri.startswith("s3://"):
        check_bucket(uri, endpoint, flag=flag, write=False)


def _bucket_exists(client, bucket: str) -> bool:  # client: a boto3 S3 client (boto3 stays lazy)
    from botocore.exceptions import ClientError

    try:
        _call(lambda: client.head_bucket(Bucket=bucket), f"reading bucket s3://{bucket}")
    except FileNotFoundError:  # HeadBucket's bare 404
        return False
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return False
        raise
    return True


def _no_such_bucket() -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": "NoSuchBucket"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "HeadBucket")


# An ETag no object has (real ones are hex digests), for a condition that must fail.
NEVER_AN_ETAG = '"00000000000000000000000000000000"'


def check_conditional_writes(uri: str, endpoint: str | None, flag: str = "--target") -> None:
    """Raise a `UsageError` unless the store refuses PUTs whose If-Match or If-None-Match condition fails.

    `promote` relies on them (job/storage/pointer.py) for the object `uri`; a store that ignores them would
    let one of two concurrent promotions overwrite the other's. The probe is an object of its own
    beside `uri`, written, overwritten under two failing conditions, and deleted.
    """
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri, flag)
    where = endpoint_url(endpoint) or "AWS S3"
    client = s3_client(endpoint, read_timeout_s=PREFLIGHT_READ_TIMEOUT_S)
    probe = f"{key.rpartition('/')[0]}/.gan-job-condition-probe-{uuid.uuid4().hex}".lstrip("/")
    ignored, unsupported = [], []

    def conditional_put(header: str, condition: dict) -> None:
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"overwritten", **condition)
            ignored.append(header)
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:
                return
            if status not in (400, 501):  # a store that does not know the header answers 400 or 501
                raise
            unsupported.append(f"{header}: {err.response.get('Error', {}).get('Code') or 'error'}")

    try:
        _call(lambda: client.put_object(Bucket=bucket, Key=probe, Body=b"probe"), f"writing s3://{bucket}/{probe}")
        for header, condition in (("If-Match", {"IfMatch": NEVER_AN_ETAG}), ("If-None-Match: *", {"IfNoneMatch": "*"})):
            _call(lambda: conditional_put(header, condition), f"writing s3://{bucket}/{probe}")
    except StorageFailed:
        raise
    except Exception as err:
        raise _explain(err, where, bucket, flag) from None
    finally:
        try:
            client.delete_object(Bucket=bucket, Key=probe)
        except Exception:  # the probe is a few bytes; a missing delete permission must not fail promote
            pass
    if ignored:
        raise UsageError(
            f"{flag} {uri}: the S3 store at {where} ignores conditional writes "
            f"(it overwrote an object despite a failing {' and '.join(ignored)}), "
            "so concurrent promotions could lose one; keep LATEST in a store that enforces them (AWS S3, MinIO)"
        )
    if unsupported:
        raise UsageError(
            f"{flag} {uri}: the S3 store at {where} refuses conditional writes ({', '.join(unsupported)}), "
            "which promote needs so that concurrent promotions lose nothing; "
            "keep LATEST in a store that supports them (AWS S3, MinIO)"
        )
