"""Whether a run holds its images in memory or streams them (`--data-loading`), decided once, by the driver.

`memory` packs the images into each node's cache and gives every worker all of them as one tensor on its device:
the fastest path, and the only one for mnist, fashion-mnist, cifar10 and IDX files. `stream` reads a folder or ZIP
of images (local or S3) through Ray Data while the workers train (`job.runtime.streaming`); nothing is packed.
`auto` streams when the packed training images would take more than MEMORY_SHARE of a worker's memory.
Why: docs/data.md#streaming
"""

from __future__ import annotations

import dataclasses
import os

from gan.datasets import check_split_sizes, shape_of
from job.config import TrainConfig
from job.errors import UsageError
from job.runtime.streaming import reader
from job.settings import DATASET_NAMES
from job.storage.data_source import stream_listing

MEMORY_SHARE = 0.25  # of a worker's memory the packed images may take before `auto` streams them
SHAPE_SAMPLE = 256  # images whose headers give a streamed run its shape when --resolution or --channels is not given
STREAMABLE = ("folder", "zip")
WORKER_MEMORY_VARIABLE = "GAN_JOB_WORKER_MEMORY_BYTES"  # a worker's memory, where the driver's node is not like theirs


def worker_memory_bytes(config: TrainConfig) -> int:
    """A worker's memory as `auto` reckons it: GAN_JOB_WORKER_MEMORY_BYTES, else this node's memory shared by the
    run's workers (as many as fit its CPUs)."""
    given = os.environ.get(WORKER_MEMORY_VARIABLE)
    if given:
        try:
            return int(given)
        except ValueError:
            raise UsageError(f"{WORKER_MEMORY_VARIABLE}={given!r} is not a number of bytes; fix or unset it") from None
    workers = min(config.max_workers or config.num_workers, os.cpu_count() or 1)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(workers, 1)


def stream_settings(config: TrainConfig) -> dict | None:
    """The settings every process of a streamed run applies (`job.runtime.driver.data_settings`'s, from the listing
    alone: nothing is decoded but a sample of headers), or None when the run holds its images in memory."""
    if config.data_loading == "memory":
        return None
    if config.data in DATASET_NAMES:
        return refuse_stream(config, config.data)
    listing = stream_listing(config.data, config.s3_endpoint)
    if listing.kind not in STREAMABLE:
        return refuse_stream(config, "IDX files" if listing.kind == "idx" else "CIFAR-10")
    train = [m for m in listing.members if m.split == "train"][: config.limit]
    check_split_sizes(listing.location, len(train), len(listing.members) - len(train))
    read = reader(listing.kind, config.data, config.s3_endpoint)
    sample = dataclasses.replace(listing, members=tuple(train[:SHAPE_SAMPLE]))
    resolution, channels = shape_of(sample, lambda member: read(member.path), config.resolution, config.channels)
    packed, memory = len(train) * channels * resolution**2, worker_memory_bytes(config)
    if config.data_loading == "auto" and packed <= MEMORY_SHARE * memory:
        return None
    sizes = f"packed they would take {packed / 2**30:.2f} GiB"
    why = (
        f"--data-loading stream; {sizes} of a worker's {memory / 2**30:.1f} GiB"
        if config.data_loading == "stream"
        else f"{sizes}, more than {MEMORY_SHARE:.0%} of a worker's {memory / 2**30:.1f} GiB"
    )
    classes = f"{len(listing.class_names)} classes" if listing.class_names else "unlabelled"
    print(
        f"data {config.data}: {len(train):,} training images, {classes}, {channels}x{resolution}x{resolution}; "
        f"streamed through Ray Data ({why})",
        flush=True,
    )
    return {
        "resolution": resolution,
        "channels": channels,
        "num_classes": len(listing.class_names),
        "data_fingerprint": f"{listing.fingerprint}-r{resolution}-c{channels}",
        "data_cutoff_ns": listing.newest_ns,
        "data_loading": "stream",
    }


def refuse_stream(config: TrainConfig, what: str) -> None:
    """None (memory) for `auto`; for `stream`, the one-line refusal of a source that is not a folder or ZIP."""
    if config.data_loading == "stream":
        raise UsageError(
            f"--data-loading stream reads a folder or ZIP of images (local or s3://); --data {config.data} is {what}, "
            "which fits in memory: use --data-loading memory or auto"
        )
    return None
