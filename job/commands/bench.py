"""The `bench` command: time the training step on this machine. Needs only PyTorch and `gan`.

Besides images/s it reports the step's arithmetic per image, `gflop_per_image`, by one rule: the
FLOPs that `torch.utils.flop_counter.FlopCounterMode` counts over one training step (the matrix
multiplications and convolutions of G's and D's forward and backward passes, 2 FLOPs per
multiply-add; elementwise work, normalisation and Adam are not counted), divided by the batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from gan.models import SUPPORTED_CHANNELS, SUPPORTED_RESOLUTIONS, Discriminator, Generator
from gan.step import GeneratorEMA, amp_dtype_for, make_optimizer
from gan.stepper import WARMUP_STEPS, Stepper, graphs_wanted, prepare_cuda
from job.errors import UsageError
from job.settings import DATA as DATA_SETTING
from job.settings import (
    CUDA_GRAPHS_MODES,
    MAX_BATCH,
    MAX_NOISE_DIM,
    MAX_STEPS,
    MAX_WARMUP,
    MAX_WORKERS,
    PRECISIONS,
    Setting,
    add_flag,
)
from job.storage.data_source import load_dataset

STEPS = Setting("timed steps", kind=int, low=1, high=MAX_STEPS)
WARMUP = Setting("untimed steps first", kind=int, low=0, high=MAX_WARMUP)
BATCH_SIZE = Setting("batch size (as train's global batch)", kind=int, low=1, high=MAX_BATCH)
DEVICE = Setting("where to run", choices=("cpu", "cuda"))
THREADS = Setting("torch threads (default: torch's own choice)", kind=int, low=1, high=MAX_WORKERS)
DATA = dataclasses.replace(DATA_SETTING, help="real images instead of random ones: a name, a path or s3:// prefix")
DATA_DIR = Setting("folder with the IDX files (with --data)")
NOISE_DIM = Setting("noise vector length", kind=int, low=1, high=MAX_NOISE_DIM)
LR = Setting("Adam learning rate", kind=float, low=0, low_open=True, high=1.0)
PRECISION = Setting("as train's --precision", choices=PRECISIONS)
RESOLUTION = Setting(
    "side of the square images G and D are built for (with --data: the data's own)",
    choices=tuple(map(str, SUPPORTED_RESOLUTIONS)),
)
CHANNELS = Setting(
    "channels of the images: 1 greyscale, 3 RGB (with --data: the data's own)",
    choices=tuple(map(str, SUPPORTED_CHANNELS)),
)
CUDA_GRAPHS = Setting(
    "as train's --cuda-graphs: the step replayed as CUDA graphs (on needs --device cuda)", choices=CUDA_GRAPHS_MODES
)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `gan-job bench` (cli.py builds the subparser and calls this)."""
    add_flag(parser, "--steps", STEPS, 20)
    add_flag(parser, "--warmup", WARMUP, 3)
    add_flag(parser, "--batch-size", BATCH_SIZE, 256)
    add_flag(parser, "--device", DEVICE, "cpu")
    add_flag(parser, "--threads", THREADS)
    add_flag(parser, "--data", DATA)
    add_flag(parser, "--data-dir", DATA_DIR)
    add_flag(parser, "--noise-dim", NOISE_DIM, 100)
    add_flag(parser, "--resolution", RESOLUTION, "28")
    add_flag(parser, "--channels", CHANNELS, "1")
    add_flag(parser, "--lr", LR, 1e-4)
    add_flag(parser, "--precision", PRECISION, "auto")
    add_flag(parser, "--cuda-graphs", CUDA_GRAPHS, "auto")
    parser.set_defaults(handler=bench)


def bench(args: argparse.Namespace) -> int:
    """`gan-job bench`: print one JSON object with images/s and GFLOP per image of the training step on this
    machine."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if args.cuda_graphs == "on" and args.device != "cuda":
        raise UsageError("--cuda-graphs on needs --device cuda; use --cuda-graphs off")
    if args.threads:
        torch.set_num_threads(args.threads)
    resolution, channels = int(args.resolution), int(args.channels)
    # Real images at the timed shape (converted by the data's rules where theirs differs), or random ones.
    images_u8 = load_dataset(args.data, args.data_dir, None, resolution, channels).train.images if args.data else None
    result = measure(
        torch.device(args.device),
        args.batch_size,
        args.steps,
        args.warmup,
        args.precision,
        args.cuda_graphs,
        args.noise_dim,
        args.lr,
        images_u8,
        resolution,
        channels,
    )
    print(json.dumps(result))
    return 0


def measure(
    device: torch.device,
    batch_size: int,  # images per step
    steps: int,  # timed steps
    warmup: int,  # untimed steps first; with graphs at least each shape's warm-up and capture
    precision: str = "auto",  # as train's --precision
    cuda_graphs: str = "off",  # as train's --cuda-graphs
    noise_dim: int = 100,
    lr: float = 1e-4,
    images_u8: torch.Tensor | None = None,  # (N, C, R, R) uint8 on any device; None = 4 batches of random images
    resolution: int = 28,  # of the random images (images_u8 brings its own)
    channels: int = 1,  # of the random images
) -> dict:
    """Time `steps` training steps as train runs them; returns bench's JSON fields."""
    stepper, run = bench_stepper(
        device, batch_size, precision, cuda_graphs, noise_dim, lr, images_u8, resolution=resolution, channels=channels
    )
    if stepper.cuda_graphs:
        warmup = max(warmup, WARMUP_STEPS + 1)  # the capture happens before the timed steps
    gflop_per_image = step_gflop(run) / batch_size  # one more untimed step, counted
    run(warmup)
    start_s = time.perf_counter()
    run(steps)
    elapsed_s = time.perf_counter() - start_s
    return {
        "images_per_s": round(steps * batch_size / elapsed_s, 1),
        "step_time_ms": round(1000 * elapsed_s / steps, 2),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "gflop_per_image": round(gflop_per_image, 4),
        "resolution": int(stepper.images_u8.shape[-1]),
        "channels": int(stepper.images_u8.shape[1]),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "precision": "bf16" if stepper.amp_dtype == torch.bfloat16 else "fp32",
        "cuda_graphs": stepper.cuda_graphs,
        "torch": torch.__version__,
    }


def step_gflop(run: Callable[[int], None]) -> float:
    """GFLOP of one training step by `run(1)`, as FlopCounterMode counts them (the module docstring's rule)."""
    with FlopCounterMode(display=False) as counter:
        run(1)
    return counter.get_total_flops() / 1e9


def bench_stepper(
    device: torch.device,
    batch_size: int,
    precision: str = "auto",
    cuda_graphs: str = "off",
    noise_dim: int = 100,
    lr: float = 1e-4,
    images_u8: torch.Tensor | None = None,
    seed: int = 0,
    ema_decay: float = 0.0,
    resolution: int = 28,  # of the random images, when images_u8 is None
    channels: int = 1,
) -> tuple[Stepper, Callable[[int], None]]:
    """The networks and step exactly as train builds them for the images' shape, and `run(steps)`, which steps
    through the images' full batches in order and waits for the device once at its end."""
    torch.manual_seed(seed)
    prepare_cuda(device)
    if images_u8 is None:
        images_u8 = torch.randint(0, 256, (batch_size * 4, channels, resolution, resolution), dtype=torch.uint8)
    images_u8 = images_u8.to(device)
    channels, resolution = int(images_u8.shape[1]), int(images_u8.shape[-1])
    order = torch.arange(images_u8.shape[0] - images_u8.shape[0] % batch_size, device=device)
    if order.numel() == 0:
        raise UsageError(f"--batch-size {batch_size} is more than the {images_u8.shape[0]} images; use a smaller batch")
    graphed = graphs_wanted(cuda_graphs, device)
    generator = Generator(noise_dim, resolution=resolution, channels=channels)
    generator = generator.to(device, memory_format=torch.channels_last)
    discriminator = Discriminator(resolution=resolution, channels=channels).to(
        device, memory_format=torch.channels_last
    )
    optimizer_g, optimizer_d = (
        make_optimizer(generator, lr, capturable=graphed),
        make_optimizer(discriminator, lr, capturable=graphed),
    )
    ema = GeneratorEMA(generator, ema_decay) if ema_decay > 0 else None  # train's tutorial recipe has none
    stepper = Stepper(
        generator,
        discriminator,
        optimizer_g,
        optimizer_d,
        images_u8,
        noise_dim,
        amp_dtype_for(precision, device),
        ema,
        cuda_graphs=graphed,
    )
    batches = order.split(batch_size)
    position = 0

    def run(steps: int) -> None:
        nonlocal position
        for _ in range(steps):
            stepper.step(batches[position % len(batches)])
            position += 1
        if steps:
            stepper.sums.sum().item()  # wait for the device once, at the end

    return stepper, run
