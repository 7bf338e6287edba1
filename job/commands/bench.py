"""The `bench` command: time the training step on this machine. Needs only PyTorch and `gan`."""

from __future__ import annotations

import argparse
import json
import time

import torch

from gan.data import iterate_batches, load_split, resolve_data_dir
from gan.models import Discriminator, Generator
from gan.step import amp_dtype_for, make_optimizer, train_step
from job.errors import UsageError
from job.settings import DATASET_NAMES, MAX_BATCH, MAX_NOISE_DIM, MAX_STEPS, MAX_WARMUP, MAX_WORKERS, PRECISIONS, Setting, add_flag

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
    parser.set_defaults(handler=bench)


def bench(args: argparse.Namespace) -> int:
    """`gan-job bench`: print one JSON object with images/s of the training step on this machine."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    # The same data path as train: uint8 on the device, batches cut and scaled there.
    if args.data:
        images_u8 = load_split(resolve_data_dir(args.data, args.data_dir), "train").images.to(device)
    else:
        images_u8 = torch.randint(0, 256, (args.batch_size * 4, 1, 28, 28), dtype=torch.uint8, device=device)
    order = torch.arange(images_u8.shape[0])

    def batches():
        while True:
            yield from iterate_batches(images_u8, order, args.batch_size)

    # The networks exactly as train builds them: channels_last, the same precision rule.
    generator = Generator(args.noise_dim).to(device, memory_format=torch.channels_last)
    discriminator = Discriminator().to(device, memory_format=torch.channels_last)
    amp_dtype = amp_dtype_for(args.precision, device)
    optimizer_g, optimizer_d = make_optimizer(generator, args.lr), make_optimizer(discriminator, args.lr)
    stream = (batch for batch in batches() if batch.shape[0] == args.batch_size)

    def run(steps: int) -> None:
        if steps == 0:  # --warmup 0
            return
        for _ in range(steps):
            real = next(stream)
            noise = torch.randn(real.shape[0], args.noise_dim, device=device)
            stats = train_step(generator, discriminator, optimizer_g, optimizer_d, real, noise, amp_dtype)
        stats["loss_d"].item()  # wait for the device once, at the end

    run(args.warmup)
    start_s = time.perf_counter()
    run(args.steps)
    elapsed_s = time.perf_counter() - start_s
    result = {
        "images_per_s": round(args.steps * args.batch_size / elapsed_s, 1),
        "step_time_ms": round(1000 * elapsed_s / args.steps, 2),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "precision": "bf16" if amp_dtype == torch.bfloat16 else "fp32",
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return 0
