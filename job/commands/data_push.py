"""The `data push` command: upload a dataset's files to a bucket, for clusters that cannot download them or reach
the folder they are in."""

from __future__ import annotations

import argparse
from pathlib import Path

from gan.data import IDX_FILES, cifar10_path, find_idx_file, load_split, resolve_data_dir
from job.errors import StorageFailed, UsageError
from job.settings import DATA, S3_ENDPOINT, add_flag
from job.storage.data_source import list_location, load_dataset
from job.storage.location import is_s3, split_s3_uri
from job.storage.retry import retried
from job.storage.s3 import s3_client
from job.storage.s3_preflight import check_bucket


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `gan-job data push` (cli.py builds the subparser and calls this)."""
    add_flag(parser, "--data", DATA, required=True)
    parser.add_argument("--data-dir", default=None, help="where the files are (default: cache, system copy, download)")
    parser.add_argument("--to", required=True, help="s3://bucket/prefix to upload to")
    add_flag(parser, "--s3-endpoint", S3_ENDPOINT)
    parser.set_defaults(handler=push)


def push(args: argparse.Namespace) -> int:
    """`gan-job data push`: upload `--data`'s files to `--to`: a name's four IDX files (CIFAR-10's tarball), or a
    folder's, ZIP's or tarball's files as they are, after every one has been read as a run would read it."""
    if not is_s3(args.to):
        raise UsageError(f"--to {args.to!r} is not an s3:// location; write it as s3://BUCKET/PREFIX")
    if is_s3(args.data):
        raise UsageError(f"--data {args.data} is in a bucket already; pass a dataset's name or a local path")
    bucket, prefix = split_s3_uri(args.to, "--to")
    files = files_to_push(args.data, args.data_dir)
    check_bucket(args.to, args.s3_endpoint, flag="--to")
    client = s3_client(args.s3_endpoint)
    for done, (file, relative) in enumerate(files):
        key = f"{prefix}/{relative}".lstrip("/")
        try:
            retried(lambda: client.upload_file(str(file), bucket, key), f"writing s3://{bucket}/{key}")
        except StorageFailed as err:
            uploaded = f"{done} of the {len(files)} files were uploaded before it" if done else "no file was uploaded"
            raise StorageFailed(str(err), outcome=f"{uploaded}; run the same command again") from None
        print(f"uploaded {file} to s3://{bucket}/{key}")
    return 0


def files_to_push(data: str, data_dir: str | None) -> list[tuple[Path, str]]:
    """The files of `data` and their keys under the prefix, each checked first (a damaged one stops the push before
    anything is uploaded): IDX files are read, images decoded, in the shape a run would take."""
    if data in ("mnist", "fashion-mnist"):
        folder = resolve_data_dir(data, data_dir)
        for split in ("train", "test"):
            load_split(folder, split)
        return [(file, file.name) for file in (find_idx_file(folder, stem) for stem in IDX_FILES.values())]
    load_dataset(data, data_dir)  # decodes every image (into this node's cache, where a run finds it too)
    if data == "cifar10":
        path = cifar10_path(data_dir)
    else:
        path = list_location(data, None)[1]
    if path.is_file():
        return [(path, path.name)]
    found = [file for file in sorted(path.rglob("*")) if file.is_file()]
    return [
        (file, file.relative_to(path).as_posix())
        for file in found
        if not any(part.startswith(".") for part in file.relative_to(path).parts)
    ]
