"""Users' own images: each source kind (a folder, a StyleGAN ZIP, CIFAR-10's binary version, a bucket prefix) packed
once into the node's cache with its labels and a split that does not move, converted by one rule, and refused in
one line when it cannot be used."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan.sources import CIFAR_RECORD, split_of
from job.cli import main
from job.storage.data_source import load_dataset
from tests.conftest import metrics_rows, train_one_process

COLOURS = ((200, 30, 30), (30, 160, 60), (40, 60, 220))


def picture(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32), seed: int = 0, mode: str = "RGB"):
    """A small image: a coloured square on a noisy background, different for each seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = colour
    image = Image.fromarray(pixels, "RGB")
    return image.convert(mode) if mode != "RGB" else image


def write_folder(root: Path, per_class: int = 20, classes: int = 3, labelled: bool = True, first: int = 0) -> Path:
    """`classes` class folders of `per_class` 32x32 PNGs (or, unlabelled, all of them directly in `root`), numbered
    from `first`."""
    for k in range(classes):
        folder = root / f"class_{k}" if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(first, first + per_class):
            picture(COLOURS[k % 3], seed=100 * k + i).save(folder / f"{k}_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_folder(tmp_path / "images")


def test_a_folder_of_class_folders_is_packed_with_its_labels_and_a_split_by_path(image_folder):
    (image_folder / "README.txt").write_text("not an image")
    dataset = load_dataset(str(image_folder))
    assert dataset.class_names == ("class_0", "class_1", "class_2") and dataset.kind == "folder"
    assert (dataset.resolution, dataset.channels, dataset.skipped) == (32, 3, 1)
    names = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))
    test_names = [name for name in names if split_of(name) == "test"]
    assert dataset.test.images.shape[0] == len(test_names) and dataset.train.images.shape[0] == 60 - len(test_names)
    assert dataset.train.images.dtype == torch.uint8 and sorted(set(dataset.train.labels.tolist())) == [0, 1, 2]
    assert dataset.decoded_per_s is not None and load_dataset(str(image_folder)).decoded_per_s is None  # cached


def test_a_folder_that_grows_keeps_every_old_image_in_its_split(image_folder):
    names = [p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png")]
    before = {name: split_of(name) for name in names}
    first = load_dataset(str(image_folder))
    write_folder(image_folder, per_class=10, first=20)  # 10 more per class beside the 20 there were
    grown = load_dataset(str(image_folder))
    assert grown.fingerprint != first.fingerprint
    assert grown.train.images.shape[0] + grown.test.images.shape[0] == 90
    assert all(split_of(name) == split for name, split in before.items())
    as_started = load_dataset(str(image_folder), cutoff_ns=first.newest_ns)  # a run that started before the growth
    assert as_started.fingerprint == first.fingerprint and torch.equal(as_started.train.images, first.train.images)


def test_images_directly_in_the_folder_are_unlabelled_and_grey_ones_give_one_channel(tmp_path):
    root = tmp_path / "grey"
    root.mkdir()
    for i in range(50):
        picture(COLOURS[i % 3], seed=i, mode="L").save(root / f"{i}.png")
    dataset = load_dataset(str(root))
    assert dataset.class_names == () and dataset.train.labels is None and dataset.channels == 1


def test_train_and_test_folders_give_a_fixed_split(tmp_path):
    for split, count in (("train", 12), ("val", 5)):
        write_folder(tmp_path / "fixed" / split, per_class=count, classes=2)
    dataset = load_dataset(str(tmp_path / "fixed"))
    assert dataset.train.images.shape[0] == 24 and dataset.test.images.shape[0] == 10
    assert dataset.class_names == ("class_0", "class_1")


def test_the_conversion_rule_crops_to_the_centre_lays_transparency_over_white_and_resizes(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    wide = Image.new("RGBA", (96, 64), (0, 0, 0, 0))  # transparent, but for a red centred 64x64 square
    wide.paste((255, 0, 0, 255), (16, 0, 80, 64))
    wide.save(root / "wide.png")
    for i in range(40):
        picture(COLOURS[i % 3], size=(48, 48), seed=i).save(root / f"{i}.png")
    dataset = load_dataset(str(root), resolution=32)
    images = torch.cat([dataset.train.images, dataset.test.images])
    assert images.shape[1:] == (3, 32, 32)
    red = [image for image in images if image[0].float().mean() > 250 and image[1].float().mean() < 5]
    assert len(red) == 1  # the centre square only: the transparent sides were cut off, not turned black


def write_zip(path: Path, labels: dict[str, int] | None, extra: bytes | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(80):
            buffer = io.BytesIO()
            picture(COLOURS[i % 2], seed=i).save(buffer, format="PNG")
            archive.writestr(f"{i // 10:05d}/img{i:08d}.png", buffer.getvalue())
        if labels is not None:
            archive.writestr("dataset.json", json.dumps({"labels": [[name, k] for name, k in labels.items()]}))
        if extra is not None:
            archive.writestr("dataset.json", extra)
    return path


def zip_labels() -> dict[str, int]:
    return {f"{i // 10:05d}/img{i:08d}.png": i % 2 for i in range(80)}


def test_a_stylegan_zip_is_labelled_by_its_dataset_json(tmp_path):
    dataset = load_dataset(str(write_zip(tmp_path / "set.zip", zip_labels())))
    assert dataset.kind == "zip" and dataset.class_names == ("0", "1")
    assert dataset.train.images.shape[0] + dataset.test.images.shape[0] == 80


def write_cifar(folder: Path, per_batch: int = 12) -> Path:
    """CIFAR-10's binary version, small: each batch file of `per_batch` records, in a tarball as published."""
    rng = np.random.default_rng(0)
    path = folder / "cifar-10-binary.tar.gz"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            records = rng.integers(0, 256, (per_batch, CIFAR_RECORD), dtype=np.uint8)
            records[:, 0] = np.arange(per_batch) % 10
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = records.nbytes
            archive.addfile(info, io.BytesIO(records.tobytes()))
    return path


def test_cifar10s_binary_tarball_is_read_as_published_and_never_unpickled(tmp_path):
    dataset = load_dataset(str(write_cifar(tmp_path / "cifar")))
    assert dataset.kind == "cifar10" and len(dataset.class_names) == 10
    assert dataset.train.images.shape == (60, 3, 32, 32) and dataset.test.images.shape == (12, 3, 32, 32)
    assert dataset.train.labels.tolist()[:12] == [k % 10 for k in range(12)]


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header is made to claim this size: what a decompression bomb looks like to a reader."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(raw[24:29])  # the size, then depth, type, ...
    raw[12:29] = header
    raw[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(raw)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("empty", "holds no images"),
        ("undecodable", "class_0/broken.png is not an image Pillow reads"),
        ("bomb", "class_0/bomb.png is larger than"),
        ("mixed", "has class folders and also images beside them, e.g. loose.png"),
        ("resolution", "--resolution: '48' is not one of 28, 32, 64, 128"),
        ("json missing file", "its dataset.json names 1 file(s) the ZIP lacks, e.g. 99999/nothing.png"),
        ("json malformed", "its dataset.json is not StyleGAN's layout"),
        ("damaged zip", "is not a ZIP that reads"),
        ("damaged tarball", "is not a tarball that reads"),
        ("too many classes", "has 1,001 class folders, more than 1000"),
    ],
)
def test_data_that_cannot_be_used_is_refused_in_one_line_naming_it(tmp_path, capsys, damage, expected):
    data, extra = tmp_path / "images", []
    if damage == "empty":
        data.mkdir()
    elif damage in ("undecodable", "bomb", "mixed", "resolution"):
        write_folder(data)
        if damage == "undecodable":
            (data / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        if damage == "bomb":
            (data / "class_0" / "bomb.png").write_bytes(png_claiming(40000, 40000))
        if damage == "mixed":
            picture(COLOURS[0]).save(data / "loose.png")
        if damage == "resolution":
            extra = ["--resolution", "48"]
    elif damage.startswith("json"):
        labels = {**zip_labels(), "99999/nothing.png": 0} if damage == "json missing file" else None
        data = write_zip(tmp_path / "set.zip", labels, b"{not json" if damage == "json malformed" else None)
    elif damage == "damaged zip":
        data = tmp_path / "set.zip"
        data.write_bytes(write_zip(tmp_path / "good.zip", None).read_bytes()[:300])
    elif damage == "damaged tarball":
        data = tmp_path / "cifar-10-binary.tar.gz"
        data.write_bytes(write_cifar(tmp_path / "good").read_bytes()[:500])
    elif damage == "too many classes":
        for k in range(1001):
            (data / f"c{k}").mkdir(parents=True)
            (data / f"c{k}" / "x.png").write_bytes(b"")
    argv = ["train", "--data", str(data), "--storage", str(tmp_path / "runs"), "--run-name", "r", *extra]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_conditional_training_on_unlabelled_images_is_refused(tmp_path, capsys):
    root = tmp_path / "loose"
    root.mkdir()
    for i in range(40):
        picture(COLOURS[i % 3], seed=i).save(root / f"{i}.png")
    assert main(["train", "--data", str(root), "--conditional", "--storage", str(tmp_path / "runs")]) == 2
    assert "--conditional needs labelled images" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["folder", "unlabelled folder", "zip", "cifar10"])
def test_each_local_source_trains_end_to_end_and_records_its_data(tmp_path, kind):
    makers = {
        "folder": lambda: write_folder(tmp_path / "images"),
        "unlabelled folder": lambda: write_folder(tmp_path / "images", per_class=40, labelled=False),
        "zip": lambda: write_zip(tmp_path / "set.zip", zip_labels()),
        "cifar10": lambda: write_cifar(tmp_path / "cifar"),
    }
    data = makers[kind]()
    run = train_one_process(
        tmp_path / "runs", None, "r", data=str(data), limit=32, batch_size=8, eval_every=1, eval_num=16
    )
    rows = metrics_rows(run)
    assert [row["epoch"] for row in rows] == [1] and rows[0]["quality"]["fid_classifier"] >= 0
    model = json.loads((run / "artifacts" / "model.json").read_text())
    assert model["data"]["shape"] == [3, 32, 32] and model["data"]["num_images"] == 32
    assert model["data"]["test_images"] > 0 and model["data"]["source_fingerprint"]
    assert Image.open(run / "artifacts" / "samples" / "epoch_001.png").mode == "RGB"  # the grid in colour


@pytest.mark.ray
@pytest.mark.s3
def test_a_bucket_prefix_trains_on_two_workers_as_it_was_when_the_run_started(ray_cluster, s3_server, tmp_path, capsys):
    s3_server.upload(write_folder(tmp_path / "images", per_class=24), "own/images")
    argv = ["train", "--data", f"s3://{s3_server.bucket}/own/images", "--storage", str(tmp_path / "runs"),
            "--run-name", "r", "--epochs", "1", "--batch-size", "8", "--num-workers", "2", "--cpus-per-worker", "1",
            "--eval-every", "0"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"data s3://{s3_server.bucket}/own/images: " in out and "3 classes, 3x32x32" in out, out
    model = json.loads((tmp_path / "runs" / "r" / "artifacts" / "model.json").read_text())
    first = load_dataset(f"s3://{s3_server.bucket}/own/images")
    assert model["data"]["source_fingerprint"] == first.fingerprint and model["data"]["shape"] == [3, 32, 32]
    # The prefix grows: a run's workers still see it as the run's driver did; a new run sees it all.
    s3_server.upload(write_folder(tmp_path / "more", per_class=5, first=50), "own/images")
    as_started = load_dataset(f"s3://{s3_server.bucket}/own/images", cutoff_ns=first.newest_ns)
    assert as_started.fingerprint == first.fingerprint
    grown = load_dataset(f"s3://{s3_server.bucket}/own/images")
    assert grown.train.images.shape[0] + grown.test.images.shape[0] == 72 + 15
