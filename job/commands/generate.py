"""The `generate` command: images from a checkpoint, as a PNG grid and optionally a .npy array.

A conditional model (trained with `--conditional`) makes the classes asked for: `--label K[,K...]`,
`--per-class` (every class), or by default every class; `--num` is split evenly over them, in the
order listed, and the labels go next to the images (`OUT.labels.npy`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from gan.grid import image_grid_png
from gan.sampling import labels_split_evenly, sample, seeded_noise
from job.errors import UsageError
from job.storage.checkpoint_schema import checkpoint_num_classes, generator_from_checkpoint
from job.settings import MAX_CLASSES, MAX_GENERATE_IMAGES, S3_ENDPOINT, SEED, Setting, add_flag
from job.storage.checkpoint import load_from
from job.storage.pointer import resolve_latest
from job.storage.s3_preflight import check_readable

GRID_MAX = 64  # the grid shows at most an 8x8 of the images
GRID_PER_CLASS = 10  # a conditional model's grid: one row per class asked for, its first 10 images
GRID_SCALE = 4  # pixels per image pixel: a 28-pixel image shows as 112, about the old matplotlib cell (100)
GRID_MAX_ROWS = 16  # more classes than this: the grid is the first GRID_MAX images, as for an unconditional model
DEFAULT_NUM = 64  # images of an unconditional model; a conditional one makes GRID_PER_CLASS per class asked for
NUM = Setting(
    f"how many images (default {DEFAULT_NUM}; a conditional model: {GRID_PER_CLASS} per class asked for); "
    "with classes, a multiple of their count, split evenly over them in order",
    kind=int,
    low=1,
    high=MAX_GENERATE_IMAGES,
)
CLASS = Setting("a class index", kind=int, low=0, high=MAX_CLASSES - 1)


def class_list(text: str) -> tuple[int, ...]:
    """`--label`: one class index or several, comma-separated (`3` or `3,5`), each listed once."""
    classes = tuple(CLASS.parse(part) for part in text.split(","))  # ValueError names the bad one
    if len(set(classes)) != len(classes):
        raise ValueError(f"{text!r} lists a class twice; list each class once")
    return classes  # type: ignore[return-value]


LABEL = Setting(
    "conditional models only: make these classes, e.g. 3 or 3,5 (--num split evenly over them, in order), "
    "each a class index",
    kind=int,
    low=0,
    high=MAX_CLASSES - 1,
    reads=class_list,
    metavar="K[,K...]",
)
PER_CLASS = Setting(
    "conditional models only: make every class, --num split evenly over them in class order (what a conditional model "
    "makes with neither --label nor --per-class, too)",
    kind=bool,
)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `gan-job generate` (cli.py builds the subparser and calls this)."""
    parser.add_argument(
        "--from", dest="source", required=True, help="run folder, checkpoint folder, LATEST pointer, or s3:// of any"
    )
    add_flag(parser, "--num", NUM)
    parser.add_argument(
        "--out",
        required=True,
        help=f"PNG grid: the first min(N, {GRID_MAX}) images; a conditional model's, one row per class asked for "
        "with its first "
        f"{GRID_PER_CLASS} (more than {GRID_MAX_ROWS} classes: as unconditional)",
    )
    parser.add_argument(
        "--npy",
        help="also save all N images as an N x 28 x 28 float32 array in [-1, 1]; a conditional model's labels "
        "(N int64) go to OUT.labels.npy next to it",
    )
    add_flag(parser, "--label", LABEL)
    add_flag(parser, "--per-class", PER_CLASS, False)
    add_flag(parser, "--seed", SEED, 0)
    add_flag(parser, "--s3-endpoint", S3_ENDPOINT)
    parser.set_defaults(handler=generate)


def labels_path(npy: str) -> Path:
    """Where `--npy OUT.npy` puts the labels: OUT.labels.npy."""
    path = Path(npy)
    return path.with_name(path.name.removesuffix(".npy") + ".labels.npy")


def classes_asked(args: argparse.Namespace, num_classes: int, source: str) -> tuple[int, ...] | None:
    """The classes to make, in order: --label's, every class (--per-class, or by default), None when unconditional."""
    if not num_classes:
        if args.label is not None or args.per_class:
            flag = "--label" if args.label is not None else "--per-class"
            raise UsageError(
                f"{flag} needs a conditional model; {source} was trained without --conditional: drop {flag}"
            )
        return None
    if args.label is None:
        return tuple(range(num_classes))
    outside = [k for k in args.label if k >= num_classes]
    if outside:
        raise UsageError(
            f"--label {outside[0]} is not a class of this model: it makes classes 0 to {num_classes - 1}; "
            "use labels in that range"
        )
    return args.label


def grid_of(images: torch.Tensor, classes: tuple[int, ...] | None) -> tuple[torch.Tensor, int | None]:
    """The images the PNG shows and its columns (None = square): a row of each class's first images where that fits."""
    if not classes or len(classes) > GRID_MAX_ROWS:
        return images[:GRID_MAX], None
    per_class = images.shape[0] // len(classes)
    columns = min(per_class, GRID_PER_CLASS)
    rows = images.view(len(classes), per_class, *images.shape[1:])[
        :, :columns
    ]  # labels_split_evenly: class blocks in order
    return rows.reshape(-1, *images.shape[1:]), columns


def generate(args: argparse.Namespace) -> int:
    """`gan-job generate`: write the grid (and the .npy) of `--num` images from `--from`."""
    # Check the input before anything is read or written.
    if args.num is not None:
        NUM.check("--num", args.num)
    SEED.check("--seed", args.seed)
    if args.label is not None and args.per_class:
        raise UsageError("--label and --per-class both name the classes; pass one of them (--per-class: all)")
    for value, flag, suffix, kind in (
        (args.out, "--out", ".png", "a PNG grid"),
        (args.npy, "--npy", ".npy", "a NumPy array"),
    ):
        if value is None:
            continue
        path = Path(value)
        if path.suffix.lower() != suffix:  # the bytes are always that format: a name that says otherwise misleads
            raise UsageError(f"{flag} {value}: it is written as {kind}; give it a name ending in {suffix}")
        if not path.parent.exists():
            raise UsageError(f"{flag} {path}: folder {path.parent} does not exist; create it first")
    check_readable(args.source, args.s3_endpoint, "--from")
    source, state = load_from(resolve_latest(args.source, args.s3_endpoint), args.s3_endpoint)  # LATEST → its run
    classes = classes_asked(args, checkpoint_num_classes(state), source.uri)
    num = args.num if args.num is not None else (GRID_PER_CLASS * len(classes) if classes else DEFAULT_NUM)
    if classes and num % len(classes):
        raise UsageError(
            f"--num {num} does not split evenly over the {len(classes)} classes asked for; "
            f"use a multiple of {len(classes)}"
        )

    # Make the images: seeded noise, and the classes split evenly in the order asked for.
    generator, _key = generator_from_checkpoint(state)
    labels = labels_split_evenly(num, classes) if classes else None
    images = sample(generator, seeded_noise(num, generator.noise_dim, args.seed), labels)
    shown, columns = grid_of(images, classes)
    Path(args.out).write_bytes(image_grid_png(shown, columns=columns, scale=GRID_SCALE))
    written = [args.out]
    if args.npy:
        # Grey images as (N, R, R), as always; colour ones as (N, 3, R, R).
        array = images[:, 0] if images.shape[1] == 1 else images
        np.save(args.npy, array.numpy().astype(np.float32))
        written.append(args.npy)
        if labels is not None:
            np.save(labels_path(args.npy), labels.numpy().astype(np.int64))
            written.append(str(labels_path(args.npy)))
    made = f"; {num // len(classes)} of each of the classes {','.join(map(str, classes))}" if classes else ""
    print(f"wrote {' and '.join(written)} from {source.uri} (epoch {state['epoch']}){made}")
    return 0
