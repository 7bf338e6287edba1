"""The `data push` command: upload the four IDX files to a bucket, for clusters that cannot download."""

from __future__ import annotations

import argparse

from gan.data import IDX_FILES, find_idx_file, load_split, resolve_data_dir
from job.errors import StorageFailed, UsageError
from job.settings import DATASET_NAMES, S3_ENDPOINT, Setting, add_flag
from job.storage.location import is_s3, split_s3_uri
from job.storage.retry import retried
from job.storage.s3 import s3_client
from job.storage.s3_preflight import check_bucket


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `gan-job data push` (cli.py builds the subparser and calls this)."""
    add_flag(parser, "--data", Setting("dataset name", choices=DATASET_NAMES), required=True)
    parser.add_argument("--data-dir", default=None, help="where the files are (default: cache, system copy, download)")
    parser.add_argument("--to", required=True, help="s3://bucket/prefix to upload to")
    add_flag(parser, "--s3-endpoint", S3_ENDPOINT)
    parser.set_defaults(handler=push)


def push(args: argparse.Namespace) -> int:
    """`gan-job data push`: upload the four IDX files of `--data` to `--to`."""
    if not is_s3(args.to):
        raise UsageError(f"--to {args.to!r} is not an s3:// location; write it as s3://BUCKET/PREFIX")
    bucket, prefix = split_s3_uri(args.to, "--to")
    folder = resolve_data_dir(args.data, args.data_dir)
    files = [find_idx_file(folder, stem) for stem in IDX_FILES.values()]
    for split in ("train", "test"):  # check every file (format, 28x28, one label each) before uploading any
        load_split(folder, split)
    check_bucket(args.to, args.s3_endpoint, flag="--to")
    client = s3_client(args.s3_endpoint)
    for done, file in enumerate(files):
        key = f"{prefix}/{file.name}".lstrip("/")
        try:
            retried(lambda: client.upload_file(str(file), bucket, key), f"writing s3://{bucket}/{key}")
        except StorageFailed as err:
            uploaded = f"{done} of the {len(files)} files were uploaded before it" if done else "no file was uploaded"
            raise StorageFailed(str(err), outcome=f"{uploaded}; run the same command again") from None
        print(f"uploaded {file} to s3://{bucket}/{key}")
    return 0
