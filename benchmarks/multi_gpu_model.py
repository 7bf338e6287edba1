#!/usr/bin/env python3
"""Several GPUs, on paper (issue 20.5): expected images/s of the training step on 1-8 GPUs, a model, not a measurement.

Inputs (docs/performance.md gives their sources):
- the step time measured on one H200 (eager, fp32): 6.6 ms at batch 64 and 7.3 ms at batch 256, fitted as
  t(b) = FIXED_MS + PER_IMAGE_MS * b: launch-bound, so the fixed part dominates;
- per step, DDP all-reduces D's 0.85 MB in one bucket and G's 9.2 MB in two (DDP's first bucket is capped at
  1 MB), three all-reduces in all, after each backward and not overlapped (the pessimistic case);
- an all-reduce of S bytes on n GPUs takes LATENCY + 2 (n - 1) / n * S / BANDWIDTH, with the latency and
  bandwidth of each link below.

Prints two Markdown tables: the job's global batch of 256 split across the GPUs (what `train` does), and a
per-GPU batch of 256 (the global batch grows with the GPUs: another optimisation, for comparison).

    python benchmarks/multi_gpu_model.py
"""

from __future__ import annotations

FIXED_MS = 6.6 - 64 * (7.3 - 6.6) / 192  # 6.37 ms: the step's launch-bound floor (H200, eager, fp32)
PER_IMAGE_MS = (7.3 - 6.6) / 192  # 0.0036 ms an image
BUCKETS_MB = (0.85, 1.0, 8.2)  # D's gradients; G's first bucket (1 MB cap) and the rest
# (latency in µs, bandwidth in GB/s) of an all-reduce. NVLink: fitted to a published 4xH100 nccl-tests run
# (24 µs at the floor, 28 µs at 1 MB, 65 µs at 8 MB). The others are assumptions, stated as such in the docs.
LINKS = {
    "NVLink, one node": (24.0, 293.0),
    "PCIe, one node": (30.0, 20.0),
    "100 Gbit/s Ethernet, a GPU per node": (60.0, 10.0),
    "25 Gbit/s Ethernet, a GPU per node": (60.0, 2.5),
}
GPUS = (1, 2, 4, 8)


def step_ms(batch_per_gpu: float) -> float:
    return FIXED_MS + PER_IMAGE_MS * batch_per_gpu


def all_reduce_ms(gpus: int, link: str) -> float:
    """The three all-reduces of one step on `gpus` GPUs over `link` (none on one GPU)."""
    if gpus == 1:
        return 0.0
    latency_us, gb_per_s = LINKS[link]
    return sum(latency_us + 2 * (gpus - 1) / gpus * mb * 1e6 / (gb_per_s * 1e9) * 1e6 for mb in BUCKETS_MB) / 1000


def images_per_s(gpus: int, link: str, batch_per_gpu: float) -> float:
    return gpus * batch_per_gpu / ((step_ms(batch_per_gpu) + all_reduce_ms(gpus, link)) / 1000)


def table(title: str, batch_per_gpu) -> str:
    lines = [f"{title}", "", "| link | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in GPUS) + " |",
             "|---|" + "---:|" * len(GPUS)]  # fmt: skip
    for link in LINKS:
        cells = [f"{images_per_s(n, link, batch_per_gpu(n)):,.0f}" for n in GPUS]
        lines.append(f"| {link} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    print(table("Global batch 256 split across the GPUs (as `train` runs), images/s:", lambda n: 256 / n))
    print()
    print(table("Batch 256 on each GPU (the global batch grows), images/s:", lambda n: 256))
    print()
    for n in GPUS[1:]:
        print(
            f"all-reduce per step on {n} GPUs: "
            + ", ".join(f"{link} {all_reduce_ms(n, link):.2f} ms" for link in LINKS)
        )
    # Doubling the GPUs at a fixed global batch halves the per-GPU batch: it saves PER_IMAGE_MS * b / 2 of a
    # step of FIXED_MS + PER_IMAGE_MS * b. It gains at least 10 % only above this per-GPU batch (NVLink's
    # all-reduce aside): 0.5 s b >= 0.1 (F + s b) + ... => b >= F / (4 s).
    print(f"doubling the GPUs gains >= 10 % only while each GPU steps on >= {FIXED_MS / (4 * PER_IMAGE_MS):.0f} images")


if __name__ == "__main__":
    main()
