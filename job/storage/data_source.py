"""Where a run's data comes from: a dataset's name (`gan.data`'s resolution order), a local path, or a bucket
prefix, packed by `gan.datasets`.

A bucket's files are mirrored once per node into the user cache, under a lock (only what changed is downloaded),
and each file is checked before it is used. Listing and reading the bucket retry as every storage call does
(`job.storage.retry`); a download that fails leaves only its own partial file. Why: docs/data.md
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from gan.data import IDX_FILES, DataError, cache_root, cifar10_path, file_lock, find_idx_file, load_split
from gan.data import missing_files, resolve_data_dir
from gan.datasets import Dataset, named_dataset, pack
from gan.idx import IdxFormatError, read_idx
from gan.sources import CIFAR_FOLDER, CIFAR_TEST, MAX_MEMBER_BYTES, Listing, SourceError, fingerprint_of
from gan.sources import files_listing, is_image_name, list_cifar10, list_folder, list_zip, walk_order
from job.config import TrainConfig
from job.settings import DATASET_NAMES
from job.storage.checkpoint import sha256_hex
from job.storage.location import is_s3, split_s3_uri
from job.storage.retry import retried
from job.storage.s3 import s3_client

MIRROR_MANIFEST = ".gan-job-mirror.json"  # in a prefix's mirror: the ETag of each file it holds


def idx_folder(name: str, data_dir: str | None, s3_endpoint: str | None) -> Path:
    """A local folder with the four IDX files of MNIST or Fashion-MNIST, fetching a bucket's copy if needed."""
    if is_s3(data_dir):
        return fetch_from_bucket(data_dir, s3_endpoint)
    return resolve_data_dir(name, data_dir)


def load_dataset(
    data: str,  # a dataset's name (mnist, fashion-mnist, cifar10), or a local path or s3://bucket/prefix of images
    data_dir: str | None = None,  # a name's files: a folder or s3:// prefix (the four IDX files; CIFAR-10's tarball)
    s3_endpoint: str | None = None,
    resolution: int | None = None,  # None: the images' own
    channels: int | None = None,  # None: the images' own
    cutoff_ns: int | None = None,  # a folder's or prefix's files changed after this (ns since the epoch) are left out
    expected: str | None = None,  # the fingerprint the run recorded when it started; another one is refused
) -> Dataset:
    """The packed dataset `data` names, from the node's cache or decoded into it now."""
    if data in ("mnist", "fashion-mnist"):
        dataset = named_dataset(data, idx_folder(data, data_dir, s3_endpoint), resolution, channels)
    elif data == "cifar10":
        where = mirror_prefix(data_dir, s3_endpoint, "--data-dir") if is_s3(data_dir) else data_dir
        dataset = named_dataset(data, None, resolution, channels, cifar=cifar10_path(where))
    else:
        listing, path = list_location(data, s3_endpoint, cutoff_ns)
        dataset = (
            idx_dataset(path, data, resolution, channels)
            if listing.kind == "idx"
            else pack(listing, path, resolution, channels)
        )
    if expected is not None and dataset.fingerprint != expected:
        raise DataError(
            f"--data {data} changed under the run: as the run started it had fingerprint {expected}, now "
            f"{dataset.fingerprint} (an image was replaced or removed); start a new run"
        )
    return dataset


def dataset_of(config: TrainConfig) -> Dataset:
    """The dataset a run's configuration names, as every process of the run loads it: the driver resolved its
    shape, fingerprint and cutoff (`job.runtime.driver.data_settings`), and a worker that finds other files fails."""
    try:
        return load_dataset(
            config.data,
            config.data_dir,
            config.s3_endpoint,
            config.resolution,
            config.channels,
            config.data_cutoff_ns,
            config.data_fingerprint,
        )
    except SourceError as err:
        raise DataError(str(err)) from None


def list_location(data: str, s3_endpoint: str | None, cutoff_ns: int | None = None) -> tuple[Listing, Path]:
    """What a location holds, and where its files are on this node (a bucket prefix is mirrored into the cache)."""
    if is_s3(data):
        return list_prefix(data, s3_endpoint, cutoff_ns)
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(
            f"--data {data} is neither a dataset's name ({', '.join(DATASET_NAMES)}) nor a file or folder here; "
            "pass one of those, or s3://bucket/prefix"
        )
    path = path.resolve()
    try:
        if path.is_dir():
            if not missing_files(path):
                return Listing("idx", data, (), (), 0, "idx"), path
            if (path / CIFAR_FOLDER).is_dir() or (path / CIFAR_TEST).is_file():
                return list_cifar10(path, data), path
            return list_folder(path, data, cutoff_ns), path
        if path.suffix.lower() == ".zip":
            return list_zip(path, data), path
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return list_cifar10(path, data), path
    except SourceError as err:
        raise DataError(str(err)) from None
    raise DataError(
        f"--data {data} is a file that is neither a ZIP of images nor CIFAR-10's binary tarball; pass a folder of "
        "images, a ZIP, or cifar-10-binary.tar.gz"
    )


def idx_dataset(folder: Path, location: str, resolution: int | None, channels: int | None) -> Dataset:
    """The four IDX files of `folder` (a dataset of MNIST's format), labelled 0..K-1 by their label files."""
    train = load_split(folder, "train")
    classes = tuple(str(k) for k in range(int(train.labels.max()) + 1))
    named = named_dataset("mnist", folder, resolution, channels)
    return Dataset(location, named.train, named.test, classes, named.fingerprint, "idx")


def list_prefix(uri: str, s3_endpoint: str | None, cutoff_ns: int | None) -> tuple[Listing, Path]:
    """A bucket prefix's images, mirrored into this node's cache (only what changed is downloaded), listed as a
    folder, fingerprinted by the bucket's own listing (keys, sizes, ETags); objects newer than `cutoff_ns` are left
    out, so that every node of a run sees the prefix as it was when the run started."""
    mirror, objects = mirror_objects(uri, s3_endpoint, cutoff_ns)
    singles = [key for key in objects if key.lower().endswith((".zip", ".tar.gz", ".tgz"))]
    try:
        if len(objects) == 1 and singles:
            path = mirror / singles[0]
            listing = list_zip(path, uri) if singles[0].lower().endswith(".zip") else list_cifar10(path, uri)
        else:
            listing = list_folder(mirror, uri)
    except SourceError as err:
        raise DataError(str(err)) from None
    entries = [(key, size, etag) for key, (size, etag, _) in objects.items()]
    newest_ns = max(modified_ns for _, _, modified_ns in objects.values())
    fingerprint = fingerprint_of(f"s3-{listing.kind}", entries)
    return dataclasses.replace(listing, fingerprint=fingerprint, newest_ns=newest_ns), mirror


def mirror_prefix(uri: str, s3_endpoint: str | None, flag: str = "--data") -> Path:
    """A bucket prefix mirrored into this node's cache, as it is now."""
    return mirror_objects(uri, s3_endpoint, None, flag)[0]


def mirror_objects(
    uri: str, s3_endpoint: str | None, cutoff_ns: int | None, flag: str = "--data"
) -> tuple[Path, dict[str, tuple[int, str, int]]]:
    """Download the objects under `uri` (as of `cutoff_ns`) that this node's mirror lacks or holds another version
    of, and remove those the prefix no longer has; the mirror and {relative key: (size, ETag, modified ns)}."""
    objects = list_objects(uri, s3_endpoint, cutoff_ns, flag)
    bucket, prefix = split_s3_uri(uri, flag)
    target = bucket_cache_dir(uri)
    client = s3_client(s3_endpoint)
    with file_lock(target.with_suffix(".lock")):
        manifest_file = target / MIRROR_MANIFEST
        held = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
        for relative, (size, etag, _) in sorted(objects.items()):
            if held.get(relative) != etag or not (target / relative).is_file():
                _fetch(client, bucket, f"{prefix}/{relative}" if prefix else relative, target / relative, size)
                held[relative] = etag
                manifest_file.write_text(json.dumps(held))
        for relative in sorted(set(held) - set(objects)):  # gone from the prefix (or newer than the run)
            (target / relative).unlink(missing_ok=True)
            del held[relative]
        manifest_file.write_text(json.dumps(held))
    return target, objects


def list_objects(
    uri: str, s3_endpoint: str | None, cutoff_ns: int | None, flag: str = "--data"
) -> dict[str, tuple[int, str, int]]:
    """The objects under `uri` (those modified by `cutoff_ns`): {relative key: (size, ETag, modified ns)}."""
    bucket, prefix = split_s3_uri(uri, flag)
    objects = {}
    for page in _pages(s3_client(s3_endpoint), bucket, prefix, uri):
        for obj in page.get("Contents", []):
            modified_ns = int(obj["LastModified"].timestamp() * 1e9)
            relative = obj["Key"][len(prefix) + 1 :] if prefix else obj["Key"]
            if relative and not relative.endswith("/") and (cutoff_ns is None or modified_ns <= cutoff_ns):
                objects[relative] = (int(obj["Size"]), obj["ETag"].strip('"'), modified_ns)
    if not objects:
        raise DataError(f"{flag} {uri} holds no objects; upload the images (`gan-job data push`) or fix the prefix")
    return objects


def stream_listing(data: str, s3_endpoint: str | None, cutoff_ns: int | None = None) -> Listing:
    """What a folder or ZIP (local, or under an s3:// prefix) holds, for a run that may stream it: listed, never
    decoded, and a prefix's images never downloaded (a ZIP in a bucket is: its members are read from each node's
    copy). Its fingerprint is the one the in-memory path records. Other sources list as `list_location` lists them."""
    if not is_s3(data):
        listing = list_location(data, s3_endpoint, cutoff_ns)[0]
    else:
        objects = list_objects(data, s3_endpoint, cutoff_ns)
        if len(objects) == 1 and next(iter(objects)).lower().endswith((".zip", ".tar.gz", ".tgz")):
            listing = list_prefix(data, s3_endpoint, cutoff_ns)[0]
        else:
            listing = prefix_listing(data, objects)
    large = next((m for m in listing.members if m.size > MAX_MEMBER_BYTES), None)
    if large is not None:
        raise DataError(
            f"--data {data}: {large.path} is larger than {MAX_MEMBER_BYTES:,} bytes; scale it down or remove it"
        )
    return listing


def prefix_listing(uri: str, objects: dict[str, tuple[int, str, int]]) -> Listing:
    """A prefix's images as `list_prefix` lists them (the same order, classes, splits and fingerprint), from the
    bucket's listing alone."""
    kept = sorted((key for key in objects if is_image_name(key)), key=walk_order)
    skipped = sum(1 for key in objects if is_image_name(key) is False)
    files = [(key, objects[key][0], objects[key][1]) for key in kept]
    try:
        listing = files_listing(files, skipped, uri, "s3-folder", max(modified for _, _, modified in objects.values()))
    except SourceError as err:
        raise DataError(str(err)) from None
    entries = [(key, size, etag) for key, (size, etag, _) in objects.items()]
    return dataclasses.replace(listing, fingerprint=fingerprint_of("s3-folder", entries))


def _pages(client, bucket: str, prefix: str, uri: str):  # client: a boto3 S3 client
    """The listing of a prefix, page by page, each page's request retried as every storage call is."""
    token = None
    while True:
        request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
        if token:
            request["ContinuationToken"] = token
        page = retried(lambda: client.list_objects_v2(**request), f"listing {uri}")
        yield page
        token = page.get("NextContinuationToken")
        if not token:
            return


def _fetch(client, bucket: str, key: str, path: Path, size: int) -> None:  # client: a boto3 S3 client
    """One object into `path`, whole or not at all (a partial file renamed once its size is right)."""
    if size > MAX_MEMBER_BYTES:
        raise DataError(f"s3://{bucket}/{key} is {size:,} bytes, more than one image or ZIP member may be; remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    retried(lambda: _download(client, bucket, key, partial), f"reading s3://{bucket}/{key}")
    if partial.stat().st_size != size:
        partial.unlink()
        raise DataError(f"s3://{bucket}/{key} arrived incomplete; run again")
    os.replace(partial, path)


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
