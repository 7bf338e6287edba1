"""The `data push` command: upload the four IDX files to a bucket, for clusters that cannot download."""

from __future__ import annotations

import argparse

from gan.data import IDX_FILES, find_idx_file, load_split, resolve_data_dir
from job.errors import UsageError
from job.storage.location import is_s3, split_s3_uri


def push(args: argparse.Namespace) -> int:
    if not is_s3(args.to):
        raise UsageError(f"--to {args.to!r} is not an s3:// location; write it as s3://BUCKET/PREFIX")
    bucket, prefix = split_s3_uri(args.to, "--to")
    folder = resolve_data_dir(args.data, args.data_dir)
    files = [find_idx_file(folder, stem) for stem in IDX_FILES.values()]
    for split in ("train", "test"):  # check every file (format, 28x28, one label each) before uploading any
        load_split(folder, split)
    from job.storage.s3 import s3_client
    from job.storage.s3_preflight import check_bucket

    check_bucket(args.to, args.s3_endpoint, flag="--to")
    client = s3_client(args.s3_endpoint)
    for file in files:
        key = f"{prefix}/{file.name}".lstrip("/")
        client.upload_file(str(file), bucket, key)
        print(f"uploaded {file} to s3://{bucket}/{key}")
    return 0
