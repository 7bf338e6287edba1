"""Where a worker's data comes from: `gan.data`'s resolution order, plus a bucket prefix.

A bucket copy is downloaded once per node into the user cache, under a lock, and each file is
checked (size and IDX header) before it is used. Listing and reading the bucket retry as every
storage call does (`job.storage.retry`); a download that fails leaves only its own partial file.
"""

from __future__ import annotations

import os
from pathlib import Path

from gan.data import IDX_FILES, DataError, cache_root, file_lock, find_idx_file, resolve_data_dir
from gan.idx import IdxFormatError, read_idx
from job.storage.checkpoint import sha256_hex
from job.storage.location import is_s3, split_s3_uri
from job.storage.retry import retried
from job.storage.s3 import s3_client


def local_data_folder(config) -> Path:  # config: job.config.TrainConfig (no import cycle)
    """A local folder with the four IDX files for `config.data`, fetching them if needed."""
    if is_s3(config.data_dir):
        return fetch_from_bucket(config.data_dir, config.s3_endpoint)
    return resolve_data_dir(config.data, config.data_dir)


def bucket_cache_dir(uri: str) -> Path:
    """The cache folder for one bucket prefix (named by a hash, so prefixes never collide)."""
    return cache_root() / "s3" / sha256_hex(uri.rstrip("/").encode())[:16]


def fetch_from_bucket(uri: str, s3_endpoint: str | None = None) -> Path:
    """Download the IDX files under `uri` into the cache (once per node) and return the folder."""
    bucket, prefix = split_s3_uri(uri, "--data-dir")
    target = bucket_cache_dir(uri)
    with file_lock(target.with_suffix(".lock")):
        if all(find_idx_file(target, stem) for stem in IDX_FILES.values()):
            return target
        client = s3_client(s3_endpoint)
        listing = retried(
            lambda: client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""), f"listing {uri}"
        )
        sizes = {obj["Key"].rsplit("/", 1)[-1]: (obj["Key"], obj["Size"]) for obj in listing.get("Contents", [])}
        target.mkdir(parents=True, exist_ok=True)
        for stem in IDX_FILES.values():
            name = next((n for n in (f"{stem}.gz", stem) if n in sizes), None)
            if name is None:
                raise DataError(f"--data-dir {uri} lacks {stem} (gzipped or not); upload it with `gan-job data push`")
            key, size = sizes[name]
            partial = target / f".{name}.partial"
            retried(lambda: _download(client, bucket, key, partial), f"reading s3://{bucket}/{key}")
            if partial.stat().st_size != size:
                partial.unlink()
                raise DataError(f"s3://{bucket}/{key} arrived incomplete; run again")
            try:
                read_idx(partial)
            except IdxFormatError as err:
                partial.unlink()
                raise DataError(f"s3://{bucket}/{key}: {err}") from None
            os.replace(partial, target / name)
    return target


def _download(client, bucket: str, key: str, path: Path) -> None:  # client: a boto3 S3 client (boto3 stays lazy)
    """One attempt at the whole object into `path` (a retry starts it again); one GET, no transfer manager,
    whose own retries would multiply those of `job.storage.retry`."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    with open(path, "wb") as handle:
        for chunk in body.iter_chunks(1 << 20):
            handle.write(chunk)
