"""Every dataset a run trains on, in one packed form: uint8 images (N, C, R, R) of each split, their labels, and
what identifies them. MNIST and Fashion-MNIST come from their IDX files; a user's images (a folder, a ZIP, CIFAR-10's
binary version) are decoded once (`gan.images`) and packed into the node's cache, keyed by the fingerprint of
their listing and the shape, under a lock, so that the workers of a node decode them once between them.

Why and how: docs/data.md
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gan.data import DATASETS, DataError, ImageSet, cache_root, file_lock, load_split
from gan.images import ImageError, convert_array, decode, read_header
from gan.models import SUPPORTED_CHANNELS, SUPPORTED_RESOLUTIONS
from gan.sources import MAX_MEMBER_BYTES, Listing, Member, SourceError, cifar_records, list_cifar10, read_cifar10

PACK_FORMAT = 1  # bump when the packed files change: older packs are made again
SPLITS = ("train", "test")
MIN_TEST_IMAGES = 4  # the k-NN of precision and recall need k + 1 real images


@dataclass(frozen=True)
class Dataset:
    """What a run trains on and is measured against, whatever its source."""

    name: str  # a dataset's name, or the location as the user gave it
    train: ImageSet
    test: ImageSet
    class_names: tuple[str, ...]  # index = label; empty for unlabelled images
    fingerprint: str  # of the source's listing (names, sizes, stamps) and the shape: what the run records
    kind: str  # "idx", "folder", "zip" or "cifar10"
    skipped: int = 0  # files of the source that are not images
    decoded_per_s: float | None = None  # images decoded per second when it was packed now; None: from the cache
    newest_ns: int | None = None  # a folder's or prefix's newest file: what a run records to see the same files

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def cache_key(self) -> str:
        """A name for files of this dataset in the cache (the evaluation classifier's): a dataset's own name, or one
        made of its location's hash."""
        if self.name in DATASETS:
            return self.name
        return "data-" + hashlib.sha256(self.name.encode()).hexdigest()[:12]

    @property
    def resolution(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    def summary(self) -> dict:
        """Plain values for a run's records: where it came from, its shape and the size of each split."""
        return {
            "name": self.name,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "shape": [self.channels, self.resolution, self.resolution],
            "train": int(self.train.images.shape[0]),
            "test": int(self.test.images.shape[0]),
            "classes": list(self.class_names),
            "skipped": self.skipped,
        }


def check_shape(resolution: int | None, channels: int | None) -> None:
    """Refuse a --resolution or --channels no network of the family is built for."""
    if resolution is not None and resolution not in SUPPORTED_RESOLUTIONS:
        raise DataError(
            f"--resolution {resolution} is not one the networks are built for; use one of "
            f"{', '.join(map(str, SUPPORTED_RESOLUTIONS))}"
        )
    if channels is not None and channels not in SUPPORTED_CHANNELS:
        raise DataError(f"--channels {channels}: use 1 (grey) or 3 (colour)")


def named_dataset(
    name: str, folder: Path, resolution: int | None = None, channels: int | None = None, cifar: Path | None = None
) -> Dataset:
    """MNIST or Fashion-MNIST from their IDX files in `folder` (at their own 28 x 28 x 1 exactly as always, or at
    another shape by the conversion rules), or CIFAR-10 from its binary version at `cifar`."""
    if name == "cifar10":
        return pack(list_cifar10(cifar, name), cifar, resolution, channels)
    check_shape(resolution, channels)
    train, test = load_split(folder, "train"), load_split(folder, "test")
    classes = tuple(str(k) for k in range(DATASETS[name].num_classes))
    if resolution in (None, 28) and channels in (None, 1):
        return Dataset(name, train, test, classes, train.fingerprint, "idx")
    shape = (resolution or 28, channels or 1)
    reshaped = [_reshaped(split, *shape) for split in (train, test)]
    return Dataset(name, *reshaped, classes, f"{train.fingerprint}-r{shape[0]}-c{shape[1]}", "idx")


def _reshaped(split: ImageSet, resolution: int, channels: int) -> ImageSet:
    images = np.stack([convert_array(image, resolution, channels) for image in split.images.numpy()])
    return ImageSet(torch.from_numpy(images), split.labels, f"{split.fingerprint}-r{resolution}-c{channels}")


def pack(listing: Listing, path: Path, resolution: int | None, channels: int | None) -> Dataset:
    """The dataset of `listing` (whose files are at `path`) at `resolution` and `channels` (None: the images' own),
    from the node's cache, or decoded now and put there (once per node: the workers of a node share the lock)."""
    check_shape(resolution, channels)
    key = f"{listing.kind}-{listing.fingerprint.replace(':', '-')}-r{resolution or 'auto'}-c{channels or 'auto'}"
    folder = cache_root() / "packed" / key
    with file_lock(folder.with_suffix(".lock")):
        cached = _load_packed(folder, listing)
        if cached is not None:
            return cached
        started_s = time.perf_counter()
        with contextlib.ExitStack() as opened:
            reader = _reader(listing, path, opened)
            shape = shape_of(listing, reader, resolution, channels)
            splits = {split: _decode_split(listing, reader, split, *shape) for split in SPLITS}
        decoded_per_s = len(listing.members) / max(time.perf_counter() - started_s, 1e-9)
        _check_splits(listing, splits)
        _store(folder, listing, splits)
    return dataclasses.replace(_load_packed(folder, listing), decoded_per_s=round(decoded_per_s, 1))


Reader = Callable[[Member], bytes]


def _reader(listing: Listing, path: Path, opened: contextlib.ExitStack) -> Reader:
    """How to read one member's bytes: from the folder, the ZIP (open while `opened` is), or CIFAR-10's batches
    (read once)."""
    if listing.kind == "folder":
        return lambda member: read_image_file(path / member.path, listing.location)
    if listing.kind == "zip":
        archive = opened.enter_context(zipfile.ZipFile(path))
        return lambda member: _zip_read(archive, member, listing.location)
    batches = read_cifar10(path, listing.location)
    return lambda member: batches[member.path]


def read_image_file(path: Path, location: str) -> bytes:
    """A file's bytes, at most MAX_MEMBER_BYTES of them: a larger one is refused, not read."""
    with open(path, "rb") as handle:
        raw = handle.read(MAX_MEMBER_BYTES + 1)
    if len(raw) > MAX_MEMBER_BYTES:
        raise SourceError(
            f"{location}: {path.name} is larger than {MAX_MEMBER_BYTES:,} bytes; scale it down or remove it"
        )
    return raw


def _zip_read(archive: zipfile.ZipFile, member: Member, location: str) -> bytes:
    try:
        return archive.read(member.path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise SourceError(f"{location}: {member.path} does not extract ({err}); the ZIP is damaged, make it again")


def shape_of(listing: Listing, reader: Reader, resolution: int | None, channels: int | None) -> tuple[int, int]:
    """The resolution and channels to pack at: as given, else the images' own (square and supported; grey or not)."""
    if listing.kind == "cifar10":
        return resolution or 32, channels or 3
    if resolution is not None and channels is not None:
        return resolution, channels
    sizes, grey = set(), True
    for member in listing.members:
        try:
            header = read_header(reader(member), f"{listing.location}: {member.path}")
        except ImageError as err:
            raise DataError(str(err)) from None
        sizes.add((header.width, header.height))
        grey = grey and header.grey
    if resolution is None:
        own = next(iter(sizes)) if len(sizes) == 1 else None
        if own is None or own[0] != own[1] or own[0] not in SUPPORTED_RESOLUTIONS:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3]) + (", ..." if len(sizes) > 3 else "")
            raise DataError(
                f"--data {listing.location} holds images of {shown}, not one square size the networks are built for; "
                f"pass --resolution (one of {', '.join(map(str, SUPPORTED_RESOLUTIONS))}): each image is then "
                "centre-cropped to a square and resized"
            )
        resolution = own[0]
    return resolution, channels or (1 if grey else 3)


def _decode_split(listing: Listing, reader: Reader, split: str, resolution: int, channels: int) -> dict:
    """One split's images (uint8 (N, C, R, R)) and labels, in the listing's order."""
    members = [m for m in listing.members if m.split == split]
    if listing.kind == "cifar10":
        images, labels = zip(*(cifar_records(reader(m), m.path) for m in members)) if members else ((), ())
        pixels = np.concatenate(images) if images else np.zeros((0, 3, 32, 32), np.uint8)
        pixels = (
            np.stack([convert_array(image, resolution, channels) for image in pixels])
            if ((resolution, channels) != (32, 3) and len(pixels))
            else pixels
        )
        return {"images": pixels, "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64)}
    pixels = np.empty((len(members), channels, resolution, resolution), dtype=np.uint8)
    for i, member in enumerate(members):
        try:
            pixels[i] = decode(reader(member), f"{listing.location}: {member.path}", resolution, channels)
        except ImageError as err:
            raise DataError(str(err)) from None
    labels = np.array([m.label for m in members], dtype=np.int64) if listing.labelled else None
    return {"images": pixels, "labels": labels}


def _check_splits(listing: Listing, splits: dict) -> None:
    check_split_sizes(listing.location, *(len(splits[split]["images"]) for split in SPLITS))


def check_split_sizes(location: str, train: int, test: int) -> None:
    """Refuse a source with no training images, or too few test images for an evaluation."""
    if not train:
        raise DataError(f"--data {location} has no training images (all {test} are test images); add images")
    if test < MIN_TEST_IMAGES:
        raise DataError(
            f"--data {location} has {test} test image(s), fewer than the {MIN_TEST_IMAGES} an evaluation "
            f"needs; add images (about one in 10 goes to the test split), or give it a test/ folder"
        )


def _store(folder: Path, listing: Listing, splits: dict) -> None:
    """Write the packed splits beside each other, then their meta.json, into `folder` as a whole (a rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".packing-"))
    try:
        meta = {
            "format": PACK_FORMAT,
            "name": listing.location,
            "kind": listing.kind,
            "fingerprint": listing.fingerprint,
            "classes": list(listing.class_names),
            "skipped": listing.skipped,
            "splits": {},
        }
        for split, arrays in splits.items():
            np.save(temp / f"{split}_images.npy", arrays["images"], allow_pickle=False)
            if arrays["labels"] is not None:
                np.save(temp / f"{split}_labels.npy", arrays["labels"], allow_pickle=False)
            meta["splits"][split] = _images_fingerprint(arrays["images"])
        (temp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)  # a pack of another format, or one whose files were damaged
        os.replace(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _images_fingerprint(images: np.ndarray) -> str:
    """`<count>:<sha256 prefix>` of the images' bytes, as `gan.data.load_split` fingerprints IDX images."""
    return f"{len(images)}:{hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]}"


def _load_packed(folder: Path, listing: Listing) -> Dataset | None:
    """The pack in `folder` when it is whole and of this listing; None otherwise (then it is made again)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != PACK_FORMAT or meta.get("fingerprint") != listing.fingerprint:
            return None
        sets = {}
        for split in SPLITS:
            images = torch.from_numpy(np.load(folder / f"{split}_images.npy", allow_pickle=False))
            labels_file = folder / f"{split}_labels.npy"
            labels = torch.from_numpy(np.load(labels_file, allow_pickle=False)) if labels_file.exists() else None
            sets[split] = ImageSet(images, labels, meta["splits"][split])
    except (OSError, ValueError, KeyError):
        return None
    shape = f"-r{sets['train'].images.shape[-1]}-c{sets['train'].images.shape[1]}"
    return Dataset(
        listing.location,
        sets["train"],
        sets["test"],
        tuple(meta["classes"]),
        listing.fingerprint + shape,
        listing.kind,
        int(meta.get("skipped", 0)),
        newest_ns=listing.newest_ns,
    )
