"""The `generate` command: images from a checkpoint, as a PNG grid and optionally a .npy array."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gan.models import Generator
from gan.plots import image_grid_png
from gan.sampling import sample, seeded_noise
from job.errors import UsageError
from job.settings import MAX_GENERATE_IMAGES, SEED, Setting, add_flag
from job.storage.checkpoint import load_from
from job.storage.pointer import resolve_latest

GRID_MAX = 64  # the grid shows at most an 8x8 of the images
NUM = Setting("how many images", kind=int, low=1, high=MAX_GENERATE_IMAGES)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `gan-job generate` (cli.py builds the subparser and calls this)."""
    parser.add_argument("--from", dest="source", required=True, help="run folder, checkpoint folder, LATEST pointer, or s3:// of any")
    add_flag(parser, "--num", NUM, 64)
    parser.add_argument("--out", required=True, help="PNG grid of the first min(N, 64) images")
    parser.add_argument("--npy", help="also save all N images as an N x 28 x 28 float32 array in [-1, 1]")
    add_flag(parser, "--seed", SEED, 0)
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    parser.set_defaults(handler=generate)


def generator_from_state(state: dict) -> Generator:
    """The generator of a checkpoint, in inference mode: its EMA weights where the run kept one."""
    generator = Generator(int(state["config"]["noise_dim"]))
    generator.load_state_dict(state.get("ema_generator") or state["generator"])
    return generator.eval()


def generate(args: argparse.Namespace) -> int:
    """`gan-job generate`: write the grid (and the .npy) of `--num` images from `--from`."""
    NUM.check("--num", args.num)
    SEED.check("--seed", args.seed)
    outputs = [Path(p) for p in (args.out, args.npy) if p]
    for path, flag in zip(outputs, ("--out", "--npy")):
        if not path.parent.exists():
            raise UsageError(f"{flag} {path}: folder {path.parent} does not exist; create it first")
    source, state = load_from(resolve_latest(args.source, args.s3_endpoint), args.s3_endpoint)  # LATEST → its run
    generator = generator_from_state(state)
    images = sample(generator, seeded_noise(args.num, generator.noise_dim, args.seed))
    Path(args.out).write_bytes(image_grid_png(images[:GRID_MAX]))
    if args.npy:
        np.save(args.npy, images[:, 0].numpy().astype(np.float32))
    print(f"wrote {args.out}" + (f" and {args.npy}" if args.npy else "") + f" from {source.uri} (epoch {state['epoch']})")
    return 0
