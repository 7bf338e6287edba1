"""The `bench` command: time the training step on this machine. Needs only PyTorch and `gan`."""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from gan.data import iterate_batches, load_split, resolve_data_dir
from gan.models import Discriminator, Generator
from gan.step import amp_dtype_for, make_optimizer, train_step
from job.errors import UsageError

MAX_BATCH = 65536  # the random batches are made up front, four batches' worth


def bench(args: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "noise_dim"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    if args.batch_size > MAX_BATCH:
        raise UsageError(f"--batch-size must be at most {MAX_BATCH}, got {args.batch_size}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr!r}")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise UsageError("--warmup must be >= 0 and --threads >= 1")
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
