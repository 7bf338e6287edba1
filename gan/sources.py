"""Where a user's images are, as a list of members with what each one's label and split are: a folder of images,
a ZIP in StyleGAN's layout, or CIFAR-10's binary version (a tarball or its folder).

Layouts (docs/data.md#sources):
- folder or ZIP: images (PNG, JPEG, WebP, BMP) at any depth; other files are skipped and counted. A first-level
  folder is a class (the names sorted give 0..K-1); images directly at that level are unlabelled; there may not
  be both. `train/` and `test/` (or `val/`) at the top give a fixed split, each holding the layout above.
  Without them, an image's split is a function of its path alone (`split_of`), so a folder or prefix that grows
  never moves an old image from one split to the other.
- a ZIP's optional `dataset.json` (StyleGAN's): `{"labels": [[name, class], ...]}` labels every image by index.
- CIFAR-10: `data_batch_1.bin` ... `data_batch_5.bin` (train) and `test_batch.bin` (test), 10,000 records each
  of one label byte and 3,072 pixel bytes (red, green, blue planes of 32 x 32), and `batches.meta.txt`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from gan.images import IMAGE_EXTENSIONS

MAX_CLASSES = 1000  # class folders or labels: ImageNet's count; beyond it a layout is taken for a mistake
TEST_SHARE = 10  # without train/ and test/, one image in TEST_SHARE (by the hash of its path) is a test image
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "test"}
MAX_MEMBER_BYTES = 256 * 2**20  # one image file, or one member of a ZIP, uncompressed
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_FOLDER = "cifar-10-batches-bin"


class SourceError(ValueError):
    """A source whose layout or contents cannot be used; the message names the file and how to fix it."""


@dataclass(frozen=True)
class Member:
    """One image of a source: its path relative to the source, its label (-1: none) and split."""

    path: str
    label: int
    split: str  # "train" or "test"
    size: int  # bytes
    stamp: str  # what changes when the file does: a modification time, an ETag, a ZIP's CRC


@dataclass(frozen=True)
class Listing:
    """What a source holds: its images, their class names (empty when unlabelled) and the files skipped."""

    kind: str  # "folder", "zip" or "cifar10"
    location: str  # as the user named it, for messages
    members: tuple[Member, ...]
    class_names: tuple[str, ...]
    skipped: int  # files that are not images by their extension
    fingerprint: str = field(default="")  # of the names, sizes and stamps: a changed source changes it
    newest_ns: int | None = None  # a folder's or prefix's newest file (ns since the epoch): the run's cutoff

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)


def split_of(path: str) -> str:
    """An image's split when its source has no train/ and test/ folders: by the SHA-256 of its relative path, so
    it never changes as the source grows. About one in TEST_SHARE is a test image."""
    return "test" if int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) % TEST_SHARE == 0 else "train"


def fingerprint_of(kind: str, entries: list[tuple[str, int, str]]) -> str:
    """`<count>:<sha256 prefix>` of a source's kind and its (name, size, stamp) entries, in name order."""
    digest = hashlib.sha256(kind.encode())
    for name, size, stamp in sorted(entries):
        digest.update(f"\0{name}\0{size}\0{stamp}".encode())
    return f"{len(entries)}:{digest.hexdigest()[:16]}"


def list_folder(root: Path, location: str, cutoff_ns: int | None = None) -> Listing:
    """A folder of images, searched recursively; files modified after `cutoff_ns` (ns since the epoch) are left out,
    as a run that started before them left them out."""
    files, skipped, newest_ns = [], 0, 0
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped += not name.startswith(".")
                continue
            stat = path.stat()
            if cutoff_ns is not None and stat.st_mtime_ns > cutoff_ns:
                continue
            newest_ns = max(newest_ns, stat.st_mtime_ns)
            files.append((relative, stat.st_size, str(stat.st_mtime_ns)))
    return files_listing(files, skipped, location, "folder", newest_ns)


def files_listing(
    files: list[tuple[str, int, str]], skipped: int, location: str, fingerprint_kind: str, newest_ns: int | None
) -> Listing:
    """A folder's Listing from its image files' (relative path, size, stamp), in walk order (`walk_order`)."""
    members, classes = _labelled(files, location)
    entries = [(m.path, m.size, m.stamp) for m in members]
    return Listing("folder", location, members, classes, skipped, fingerprint_of(fingerprint_kind, entries), newest_ns)


def walk_order(path: str) -> tuple:
    """A sort key that puts relative paths in the order `list_folder` walks a folder: a folder's files (by name)
    before its subfolders (by name), so that a bucket's keys list as their mirror does."""
    parts = PurePosixPath(path).parts
    return tuple((1, part) for part in parts[:-1]) + ((0, parts[-1]),)


def is_image_name(path: str) -> bool | None:
    """True for an image file's name, False for another file, None for a hidden one (neither used nor counted)."""
    name = PurePosixPath(path).name
    if name.startswith(".") or any(part.startswith(".") for part in PurePosixPath(path).parts[:-1]):
        return None
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def list_zip(path: Path, location: str) -> Listing:
    """A ZIP in StyleGAN's layout: images at any depth, and an optional dataset.json of their labels."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if not i.is_dir()]
            labels_file = next((i for i in infos if i.filename == "dataset.json"), None)
            declared = _dataset_json(archive.read(labels_file), location) if labels_file else None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise SourceError(f"{location} is not a ZIP that reads ({err}); make it again, e.g. with `zip -r`") from None
    files, skipped = [], 0
    for info in infos:
        name = PurePosixPath(info.filename).name
        if info.filename == "dataset.json" or name.startswith("."):
            continue
        if PurePosixPath(info.filename).suffix.lower() not in IMAGE_EXTENSIONS:
            skipped += 1
            continue
        if info.file_size > MAX_MEMBER_BYTES:
            raise SourceError(
                f"{location}: {info.filename} is {info.file_size:,} bytes uncompressed, more than "
                f"{MAX_MEMBER_BYTES:,}; a ZIP bomb or a damaged ZIP: make it again"
            )
        files.append((info.filename, info.file_size, f"{info.CRC:08x}"))
    if declared is None:
        members, classes = _labelled(files, location)
    else:
        members, classes = _declared(files, declared, location)
    entries = [(m.path, m.size, m.stamp) for m in members]
    return Listing("zip", location, members, classes, skipped, fingerprint_of("zip", entries))


def _dataset_json(raw: bytes, location: str) -> dict[str, int] | None:
    """StyleGAN's dataset.json: `{"labels": [[name, class], ...]}` as {name: class}, or None (`"labels": null`)."""
    try:
        document = json.loads(raw.decode("utf-8"))
        labels = document["labels"]
        if labels is None:
            return None
        pairs = {str(name): int(label) for name, label in labels}
    except (ValueError, KeyError, TypeError) as err:
        raise SourceError(
            f"{location}: its dataset.json is not StyleGAN's layout, "
            f'{{"labels": [["name.png", 0], ...]}} ({type(err).__name__}); fix or remove it'
        ) from None
    if any(label < 0 or label >= MAX_CLASSES for label in pairs.values()):
        raise SourceError(f"{location}: its dataset.json has a label outside 0..{MAX_CLASSES - 1}; fix it")
    return pairs


def _declared(files: list[tuple[str, int, str]], declared: dict[str, int], location: str):
    """Members labelled by dataset.json, which must name every image and only them."""
    names = {name for name, _, _ in files}
    missing = sorted(set(declared) - names)
    if missing:
        raise SourceError(
            f"{location}: its dataset.json names {len(missing)} file(s) the ZIP lacks, e.g. "
            f"{missing[0]}; fix dataset.json or add the files"
        )
    unlabelled = sorted(names - set(declared))
    if unlabelled:
        raise SourceError(
            f"{location}: its dataset.json gives no label for {len(unlabelled)} image(s), e.g. "
            f"{unlabelled[0]}; label every image or none"
        )
    members = tuple(Member(name, declared[name], _split(name, None), size, stamp) for name, size, stamp in files)
    classes = tuple(str(k) for k in range(max(declared.values()) + 1))
    return members, classes


def _split(path: str, fixed: str | None) -> str:
    return SPLIT_FOLDERS[fixed] if fixed else split_of(path)


def _labelled(files: list[tuple[str, int, str]], location: str) -> tuple[tuple[Member, ...], tuple[str, ...]]:
    """Members labelled by their first-level folder (under train/ and test/ when the source has them)."""
    if not files:
        raise SourceError(
            f"{location} holds no images ({', '.join(IMAGE_EXTENSIONS)}); point --data at a folder, "
            "prefix or ZIP of images"
        )
    tops = {PurePosixPath(name).parts[0] for name, _, _ in files if len(PurePosixPath(name).parts) > 1}
    fixed = bool(tops & set(SPLIT_FOLDERS))
    placed = []
    for name, size, stamp in files:
        parts = PurePosixPath(name).parts
        split_folder = parts[0] if fixed and len(parts) > 1 and parts[0] in SPLIT_FOLDERS else None
        if fixed and split_folder is None:
            raise SourceError(
                f"{location} has train/ and test/ (or val/) folders, and also {name} beside them; "
                "move every image into one of them"
            )
        inner = parts[1:] if split_folder else parts
        placed.append((name, size, stamp, split_folder, inner[0] if len(inner) > 1 else None))
    named = sorted({cls for *_, cls in placed if cls is not None})
    if named and any(cls is None for *_, cls in placed):
        example = next(name for name, *_, cls in placed if cls is None)
        raise SourceError(
            f"{location} has class folders and also images beside them, e.g. {example}; put every "
            "image in a class folder, or none"
        )
    if len(named) > MAX_CLASSES:
        raise SourceError(
            f"{location} has {len(named):,} class folders, more than {MAX_CLASSES}; is --data one level too high?"
        )
    index = {cls: i for i, cls in enumerate(named)}
    members = tuple(
        Member(name, index[cls] if cls is not None else -1, _split(name, split_folder), size, stamp)
        for name, size, stamp, split_folder, cls in placed
    )
    return members, tuple(named)


def list_cifar10(path: Path, location: str) -> Listing:
    """CIFAR-10's binary version: the tarball (`cifar-10-binary.tar.gz`) or its `cifar-10-batches-bin/` folder."""
    sizes = {name: size for name, size in _cifar_files(path, location, read=False).items()}
    missing = [name for name in (*CIFAR_TRAIN, CIFAR_TEST) if name not in sizes]
    if missing:
        raise SourceError(
            f"{location} lacks {', '.join(missing)} of CIFAR-10's binary version; download cifar-10-binary.tar.gz again"
        )
    members = []
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        if sizes[name] % CIFAR_RECORD:
            raise SourceError(
                f"{location}: {name} holds {sizes[name]:,} bytes, not whole records of {CIFAR_RECORD}; the file is "
                "damaged, download it again"
            )
        members.append(Member(name, -1, "test" if name == CIFAR_TEST else "train", sizes[name], str(sizes[name])))
    stat = path.stat()  # the tarball (or folder) itself: a replaced file changes its fingerprint
    entries = [(m.path, m.size, m.stamp) for m in members] + [(path.name, stat.st_size, str(stat.st_mtime_ns))]
    return Listing("cifar10", location, tuple(members), CIFAR_CLASSES, 0, fingerprint_of("cifar10", entries))


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_cifar10(path: Path, location: str) -> dict[str, bytes]:
    """CIFAR-10's batch files by name, read whole."""
    return _cifar_files(path, location, read=True)


def _cifar_files(path: Path, location: str, read: bool) -> dict:
    """CIFAR-10's batch files in the tarball or folder `path`: their sizes, or (`read`) their bytes."""
    wanted = (*CIFAR_TRAIN, CIFAR_TEST)
    if path.is_dir():
        folder = path / CIFAR_FOLDER if (path / CIFAR_FOLDER).is_dir() else path
        files = [p for p in folder.iterdir() if p.is_file() and p.name in wanted]
        return {p.name: p.read_bytes() if read else p.stat().st_size for p in files}
    found = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for info in archive:
                name = PurePosixPath(info.name).name
                if not (info.isfile() and name in wanted):
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    raise SourceError(f"{location}: {info.name} is larger than CIFAR-10's; the tarball is damaged")
                found[name] = archive.extractfile(info).read() if read else info.size
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise SourceError(f"{location} is not a tarball that reads ({err}); download it again") from None
    return found


def cifar_records(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 batch's images, uint8 (N, 3, 32, 32), and labels (N,)."""
    if len(raw) % CIFAR_RECORD:
        raise SourceError(f"{name} is not whole records of {CIFAR_RECORD} bytes; download it again")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        raise SourceError(f"{name} holds a label above 9; it is not CIFAR-10's binary version")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels
