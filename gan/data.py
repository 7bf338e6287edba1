"""MNIST-style data: where the four IDX files come from, loading them, and sharding across ranks.

Resolution order: an explicit folder; the user cache; a system copy (Debian's
`dataset-fashion-mnist`); a torchvision download into the cache, locked so that workers on one
node do not race. The whole set fits in memory, so it is loaded once as a uint8 tensor and batches
are cut from it on the device, with no per-image Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, overload

import torch

from gan.idx import IdxFormatError, read_idx

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_class: str  # the torchvision dataset that downloads it
    system_dirs: tuple[str, ...]  # where distributions install a copy
    num_classes: int = 10  # classes in the label files (0..num_classes-1): a conditional model's size


DATASETS = {
    "mnist": DatasetInfo("mnist", "MNIST", ("/usr/share/datasets/mnist",)),
    "fashion-mnist": DatasetInfo("fashion-mnist", "FashionMNIST", ("/usr/share/datasets/fashion-mnist",)),
    "cifar10": DatasetInfo("cifar10", "CIFAR10", ()),  # its binary version: `cifar10_path`
}
# CIFAR-10's binary version (no pickle in it), as its authors publish it, and the MD5 they give.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FILE = "cifar-10-binary.tar.gz"


class DataError(ValueError):
    """The data cannot be found or read; the message says how to provide it."""


def cache_root() -> Path:
    """The user cache of this project: `$XDG_CACHE_HOME/gan-job` (or `~/.cache/gan-job`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gan-job"


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """The file for `stem` in `folder`, gzipped or not."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def missing_files(folder: Path) -> list[str]:
    """The IDX files that `folder` lacks (empty when it holds a complete data set)."""
    return [stem for stem in IDX_FILES.values() if find_idx_file(folder, stem) is None]


def cache_dir(name: str) -> Path:
    """Where a copy fetched from a bucket (or placed by hand) is kept for `name`."""
    return cache_root() / "data" / name


def _torchvision_dir(info: DatasetInfo) -> Path:
    return cache_root() / "torchvision" / info.torchvision_class / "raw"


def find_local_copy(name: str) -> Path | None:
    """The first complete local copy in the cache or the system, without downloading."""
    info = dataset_info(name)
    candidates = [cache_dir(name), _torchvision_dir(info), *map(Path, info.system_dirs)]
    return next((folder for folder in candidates if not missing_files(folder)), None)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on one node (held while the block runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download(name: str) -> Path:
    """Download `name` with torchvision into the cache, once per node."""
    info = dataset_info(name)
    target = _torchvision_dir(info)
    with file_lock(cache_root() / f"{name}.lock"):
        if not missing_files(target):
            return target
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, info.torchvision_class)
        try:
            for train in (True, False):
                dataset_class(root=str(target.parent.parent), train=train, download=True)
        except Exception as err:  # network errors come in many types; all mean the same here
            raise DataError(
                f"could not download {name} ({type(err).__name__}); offline, pass --data-dir with the four "
                f"IDX files ({', '.join(IDX_FILES.values())}), put them in {cache_dir(name)}"
                + (", or install Debian's dataset-fashion-mnist" if name == "fashion-mnist" else "")
            ) from None
    return target


def resolve_data_dir(name: str, data_dir: str | Path | None = None, allow_download: bool = True) -> Path:
    """The folder that holds `name`'s four IDX files, in the documented resolution order."""
    dataset_info(name)
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"--data-dir {folder} does not exist; pass a folder that holds the IDX files")
        absent = missing_files(folder)
        if absent:
            raise DataError(f"--data-dir {folder} lacks {', '.join(absent)} (gzipped or not); add them or fix the path")
        return folder
    local = find_local_copy(name)
    if local is not None:
        return local
    if not allow_download:
        raise DataError(f"no local copy of {name}; pass --data-dir or allow the download")
    return download(name)


def cifar10_path(data_dir: str | Path | None = None, allow_download: bool = True) -> Path:
    """CIFAR-10's binary version: in `data_dir` (the tarball, or its cifar-10-batches-bin/ folder), else in the
    cache, else downloaded there (once per node, under a lock, its MD5 checked). The python version, a pickle, is
    never read."""
    candidates = [Path(data_dir)] if data_dir is not None else [cache_dir("cifar10")]
    for folder in candidates:
        for found in (folder / CIFAR10_FILE, folder / "cifar-10-batches-bin", folder):
            if found.is_file() or (found.is_dir() and (found / "test_batch.bin").is_file()):
                return found
    if data_dir is not None:
        raise DataError(f"--data-dir {data_dir} holds neither {CIFAR10_FILE} nor cifar-10-batches-bin/; add it")
    if not allow_download:
        raise DataError(f"no local copy of cifar10; pass --data-dir with {CIFAR10_FILE} or allow the download")
    target = cache_dir("cifar10")
    with file_lock(cache_root() / "cifar10.lock"):
        if (target / CIFAR10_FILE).is_file():
            return target / CIFAR10_FILE
        from torchvision.datasets.utils import download_url

        try:
            download_url(CIFAR10_URL, str(target), CIFAR10_FILE, CIFAR10_MD5)
        except Exception as err:  # network errors come in many types; all mean the same here
            raise DataError(
                f"could not download cifar10 ({type(err).__name__}); offline, pass --data-dir with {CIFAR10_FILE} "
                f"(from {CIFAR10_URL}), or put it in {target}"
            ) from None
    return target / CIFAR10_FILE


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, C, R, R) with their labels, and a fingerprint of the image bytes."""

    images: torch.Tensor
    labels: torch.Tensor | None  # (N,) class indices; None for unlabelled images
    fingerprint: str


def load_split(folder: Path, split: str = "train", limit: int | None = None) -> ImageSet:
    """Load the `train` or `test` split of the IDX files in `folder` (the first `limit` images)."""
    images_file = find_idx_file(folder, IDX_FILES[f"{split}_images"])
    labels_file = find_idx_file(folder, IDX_FILES[f"{split}_labels"])
    if images_file is None or labels_file is None:
        raise DataError(f"{folder} lacks the {split} IDX files; see --data-dir")
    try:
        images, labels = read_idx(images_file), read_idx(labels_file)
    except IdxFormatError as err:
        raise DataError(str(err)) from None
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(
            f"{images_file} holds images of shape {tuple(images.shape[1:])}, expected 28x28; "
            "use MNIST-format files or fix --data-dir"
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_file} holds {labels.shape[0]} labels for {images.shape[0]} images in {images_file}; "
            "use the matching labels file or fix --data-dir"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
    return ImageSet(images.unsqueeze(1), labels, f"{images.shape[0]}:{digest}")


def to_unit_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 in [-1, 1], the range of G's tanh."""
    return images_u8.float().mul_(1 / 127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] → uint8 pixels, the inverse of `to_unit_range` (to 1/255);
    out-of-range values clamp."""
    return images.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def shard_indices(
    num_images: int, rank: int, world_size: int, epoch: int, seed: int, multiple: int | None = None
) -> torch.Tensor:
    """This rank's image indices for `epoch`: disjoint from the other ranks', all of equal size.

    The permutation depends only on seed + epoch, so every rank computes the same one without
    talking. The last `num_images % multiple` images of each epoch's order are left out, a
    different few each epoch, so that every rank runs the same number of steps. `multiple` is the
    world size (the default), or a multiple of every world size an elastic run may take, so that
    the epoch has the same images and steps at each.
    """
    multiple = multiple or world_size
    if multiple % world_size:
        raise ValueError(f"multiple {multiple} is not a multiple of the world size {world_size}")
    order = epoch_permutation(num_images, epoch, seed)
    per_rank = (num_images - num_images % multiple) // world_size
    return order[rank * per_rank : (rank + 1) * per_rank]


def epoch_permutation(num_images: int, epoch: int, seed: int) -> torch.Tensor:
    """The epoch's order of all the images, a function of seed + epoch alone: what every rank cuts its shard from,
    whether its images are held in memory or streamed."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed + epoch))


@overload
def iterate_batches(images_u8: torch.Tensor, indices: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]: ...


@overload
def iterate_batches(
    images_u8: torch.Tensor, indices: torch.Tensor, batch_size: int, labels: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def iterate_batches(
    images_u8: torch.Tensor,  # (N, 1, 28, 28) uint8, on the device the batches are wanted on
    indices: torch.Tensor,  # this rank's image indices, in order (`shard_indices`)
    batch_size: int,  # images per batch
    labels: torch.Tensor | None = None,  # (N,) class of each image; None = yield the images alone
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of float images in [-1, 1], cut from a uint8 tensor on its own device.

    The last batch is smaller when the shard does not divide, as with the tutorial's
    `Dataset.batch`. With `labels`, each batch comes as (images, labels), the labels as int64 (what
    `nn.Embedding` takes) on the images' device; put them there once beforehand to spare a copy.
    """
    indices = indices.to(images_u8.device)
    if labels is None:
        for start in range(0, indices.shape[0], batch_size):
            yield to_unit_range(images_u8.index_select(0, indices[start : start + batch_size]))
        return
    labels = labels.to(images_u8.device)
    for start in range(0, indices.shape[0], batch_size):
        batch = indices[start : start + batch_size]
        yield to_unit_range(images_u8.index_select(0, batch)), labels.index_select(0, batch).long()
