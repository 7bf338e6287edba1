"""The `generate` command: images from a checkpoint, as a PNG grid and optionally a .npy array."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from gan.models import Generator
from gan.plots import image_grid_png
from job.storage.checkpoint import load_from
from job.config import MAX_SEED
from job.errors import UsageError

GRID_MAX = 64  # the grid shows at most an 8x8 of the images
MAX_IMAGES = 1_000_000  # the .npy alone is 3 GB at this count
CHUNK = 1024  # images per forward pass, to bound memory for large --num


def generator_from_state(state: dict) -> Generator:
    """The generator of a checkpoint, in inference mode: its EMA weights where the run kept one."""
    generator = Generator(int(state["config"]["noise_dim"]))
    generator.load_state_dict(state.get("ema_generator") or state["generator"])
    return generator.eval()


def sample_images(generator: Generator, num: int, seed: int) -> torch.Tensor:
    """`num` images (num, 1, 28, 28) in [-1, 1] from seeded noise."""
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, generator.noise_dim, generator=rng)
    with torch.no_grad():
        return torch.cat([generator(chunk) for chunk in noise.split(CHUNK)])


def generate(args: argparse.Namespace) -> int:
    if not 1 <= args.num <= MAX_IMAGES:
        raise UsageError(f"--num must be an integer in [1, {MAX_IMAGES}], got {args.num}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer in [0, {MAX_SEED}], got {args.seed}")
    outputs = [Path(p) for p in (args.out, args.npy) if p]
    for path, flag in zip(outputs, ("--out", "--npy")):
        if not path.parent.exists():
            raise UsageError(f"{flag} {path}: folder {path.parent} does not exist; create it first")
    from job.commands.promote import resolve_latest

    source, state = load_from(resolve_latest(args.source, args.s3_endpoint), args.s3_endpoint)  # LATEST → its run
    images = sample_images(generator_from_state(state), args.num, args.seed)
    Path(args.out).write_bytes(image_grid_png(images[:GRID_MAX]))
    if args.npy:
        np.save(args.npy, images[:, 0].numpy().astype(np.float32))
    print(f"wrote {args.out}" + (f" and {args.npy}" if args.npy else "") + f" from {source.uri} (epoch {state['epoch']})")
    return 0
