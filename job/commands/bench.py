"""The `bench` command: time the training step on this machine. Needs only PyTorch and `gan`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from gan.data import load_split, resolve_data_dir
from gan.models import Discriminator, Generator
from gan.step import GeneratorEMA, amp_dtype_for, make_optimizer
from gan.stepper import WARMUP_STEPS, Stepper, graphs_wanted, prepare_cuda
from job.errors import UsageError
from job.settings import (
    CUDA_GRAPHS_MODES,
    DATASET_NAMES,
    MAX_BATCH,
    MAX_NOISE_DIM,
    MAX_STEPS,
    MAX_WARMUP,
    MAX_WORKERS,
    PRECISIONS,
    Setting,
    add_flag,
)

STEPS = Setting("timed steps", kind=int, low=1, high=MAX_STEPS)
WARMUP = Setting("untimed steps first", kind=int, low=0, high=MAX_WARMUP)
BATCH_SIZE = Setting("batch size (as train's global batch)", kind=int, low=1, high=MAX_BATCH)
DEVICE = Setting("where to run", choices=("cpu", "cuda"))
THREADS = Setting("torch threads (default: torch's own choice)", kind=int, low=1, high=MAX_WORKERS)
DATA = Setting("real images instead of random ones", choices=DATASET_NAMES)
DATA_DIR = Setting("folder with the IDX files (with --data)")
NOISE_DIM = Setting("noise vector length", kind=int, low=1, high=MAX_NOISE_DIM)
LR = Setting("Adam learning rate", kind=float, low=0, low_open=True, high=1.0)
PRECISION = Setting("as train's --precision", choices=PRECISIONS)
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
    add_flag(parser, "--lr", LR, 1e-4)
    add_flag(parser, "--precision", PRECISION, "auto")
    add_flag(parser, "--cuda-graphs", CUDA_GRAPHS, "auto")
    parser.set_defaults(handler=bench)


def bench(args: argparse.Namespace) -> int:
    """`gan-job bench`: print one JSON object with images/s of the training step on this machine."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if args.cuda_graphs == "on" and args.device != "cuda":
        raise UsageError("--cuda-graphs on needs --device cuda; use --cuda-graphs off")
    if args.threads:
        torch.set_num_threads(args.threads)
    images_u8 = load_split(resolve_data_dir(args.data, args.data_dir), "train").images if args.data else None
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
    images_u8: torch.Tensor | None = None,  # (N, 1, 28, 28) uint8 on any device; None = 4 batches of random images
) -> dict:
    """Time `steps` training steps as train runs them; returns bench's JSON fields."""
    stepper, run = bench_stepper(device, batch_size, precision, cuda_graphs, noise_dim, lr, images_u8)
    if stepper.cuda_graphs:
        warmup = max(warmup, WARMUP_STEPS + 1)  # the capture happens before the timed steps
    run(warmup)
    start_s = time.perf_counter()
    run(steps)
    elapsed_s = time.perf_counter() - start_s
    return {
        "images_per_s": round(steps * batch_size / elapsed_s, 1),
        "step_time_ms": round(1000 * elapsed_s / steps, 2),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "precision": "bf16" if stepper.amp_dtype == torch.bfloat16 else "fp32",
        "cuda_graphs": stepper.cuda_graphs,
        "torch": torch.__version__,
    }


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
) -> tuple[Stepper, Callable[[int], None]]:
    """The networks and step exactly as train builds them, and `run(steps)`, which steps through the images'
    full batches in order and waits for the device once at its end."""
    torch.manual_seed(seed)
    prepare_cuda(device)
    if images_u8 is None:
        images_u8 = torch.randint(0, 256, (batch_size * 4, 1, 28, 28), dtype=torch.uint8)
    images_u8 = images_u8.to(device)
    order = torch.arange(images_u8.shape[0] - images_u8.shape[0] % batch_size, device=device)
    if order.numel() == 0:
        raise UsageError(f"--batch-size {batch_size} is more than the {images_u8.shape[0]} images; use a smaller batch")
    graphed = graphs_wanted(cuda_graphs, device)
    generator = Generator(noise_dim).to(device, memory_format=torch.channels_last)
    discriminator = Discriminator().to(device, memory_format=torch.channels_last)
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
