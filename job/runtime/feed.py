"""Where a worker's batches come from: its images held in memory, or streamed through Ray Data.

Both feeds give the loop the same thing: for an epoch, from a step on, the indices of each batch into the stepper's
images (`images_u8`, on the device), cut by one rule (`gan.epoch.EpochShape`) from one order (`gan.data.shard_indices`'s
permutation). `MemoryFeed` holds the whole training set there; `StreamFeed` holds one batch, which it fills from
this rank's Ray Data shard before each step, so that both paths train on the same images in the same order.
Why: docs/data.md#streaming
"""

from __future__ import annotations

import hashlib
import time
from typing import Iterator, Protocol

import numpy as np
import torch

from gan.data import ImageSet, shard_indices
from gan.datasets import Dataset
from gan.epoch import EpochShape, index_batches
from job.config import TrainConfig
from job.runtime.streaming import PREFETCH_BATCHES, StreamPlan, decode_rows, epoch_order
from job.storage.data_source import dataset_of

EVAL_SAMPLE = 10_000  # a streamed run is evaluated against at most this many test images, and as many training images
EVAL_SAMPLE_SEED = 0


class Feed(Protocol):
    """What the loop trains from."""

    name: str  # "memory" or "stream": what the rows' data_loading says
    shape: EpochShape
    images_u8: torch.Tensor  # the stepper's images, on the device
    labels: torch.Tensor | None  # their classes (a conditional run's), on the device
    fingerprint: str  # of the training images, as checkpoints record it
    record: dict  # what model.json says of the data

    def batches(self, epoch: int, first_step: int) -> Iterator[torch.Tensor]:
        """The epoch's batches from `first_step` on, as indices into `images_u8`, each filled before it is yielded."""

    def take_wait_s(self) -> float:
        """Seconds the steps waited for data since the last call."""

    def evaluation_data(self) -> Dataset:
        """The real images the run's quality is measured against (built when first asked for)."""


def open_feed(config: TrainConfig, session) -> tuple[TrainConfig, Feed]:
    """This rank's feed (session: a `job.runtime.loop.WorkerSession`), and `config` with the data's shape."""
    streamed = session.stream()
    if streamed is not None:
        return config, StreamFeed(config, *streamed, session.rank, session.world_size, session.device)
    config, dataset, train = load_data(config)
    return config, MemoryFeed(config, dataset, train, session.rank, session.world_size, session.device)


class MemoryFeed:
    """The whole training set on the device; batches are cut there by index."""

    name = "memory"

    def __init__(
        self, config: TrainConfig, dataset: Dataset, train: ImageSet, rank: int, world_size: int, device: torch.device
    ) -> None:
        self.config, self.dataset, self.rank = config, dataset, rank
        self.shape = EpochShape(
            train.images.shape[0], world_size, config.shard_multiple, config.batch_size // world_size
        )
        self.images_u8 = train.images.to(device)
        self.labels = train.labels.to(device, torch.long) if config.conditional else None
        self.fingerprint = train.fingerprint
        self.record = {**data_record(dataset, train), "loading": self.name}

    def batches(self, epoch: int, first_step: int) -> Iterator[torch.Tensor]:
        shape = self.shape
        order = shard_indices(shape.num_images, self.rank, shape.world_size, epoch, self.config.seed, shape.multiple)
        return index_batches(order.to(self.images_u8.device), shape, first_step)

    def take_wait_s(self) -> float:
        return 0.0

    def evaluation_data(self) -> Dataset:
        return self.dataset


class StreamFeed:
    """One batch on the device, filled from this rank's Ray Data shard (`job.runtime.streaming.rank_rows`), whose
    rows come in the run's order: a row's place in it is (epoch - 1) x shape.used + its position in the shard. Rows
    before the batch wanted are passed over; a batch the shard has already passed (after a rollback, or a restart
    from another checkpoint than the shard started at) is read and decoded here."""

    name = "stream"

    def __init__(
        self, config: TrainConfig, plan: StreamPlan, shard, rank: int, world_size: int, device: torch.device
    ) -> None:  # shard: a ray.data.DataIterator
        self.plan, self.shard, self.rank, self.device = plan, shard, rank, device
        self.shape = plan.shape(world_size)
        size = self.shape.batch_per_rank
        self.images_u8 = torch.zeros((size, plan.channels, plan.resolution, plan.resolution), dtype=torch.uint8)
        self.images_u8 = self.images_u8.to(device)
        self.labels = torch.zeros(size, dtype=torch.long, device=device) if config.conditional else None
        self.positions = torch.arange(size, device=device)
        self.fingerprint = f"{plan.count}:stream-{plan.fingerprint}"
        self.record = {
            "name": plan.name,
            "fingerprint": self.fingerprint,
            "num_images": plan.count,
            "source_fingerprint": plan.fingerprint,
            "test_images": plan.test_count,
            "shape": [plan.channels, plan.resolution, plan.resolution],
            "classes": list(plan.class_names),
            "loading": self.name,
        }
        self.wait_s = 0.0
        self._rows: Iterator[dict] | None = None  # the shard's batches, from the first one asked for on
        self._pending: dict[str, torch.Tensor] | None = None  # rows taken from the shard, not yet trained on
        self._evaluation: Dataset | None = None

    def batches(self, epoch: int, first_step: int) -> Iterator[torch.Tensor]:
        for step in range(first_step, self.shape.steps):
            start, size = self.shape.batch_at(step)
            began_s = time.perf_counter()
            place = (epoch - 1) * self.shape.used + start
            rows = self._take(place, size) or self._decode_here(epoch, start, size)
            self.wait_s += time.perf_counter() - began_s
            self.images_u8[:size].copy_(rows["images"], non_blocking=True)
            if self.labels is not None:
                self.labels[:size].copy_(rows["labels"], non_blocking=True)
            yield self.positions[:size]

    def take_wait_s(self) -> float:
        waited, self.wait_s = self.wait_s, 0.0
        return waited

    def _take(self, place: int, size: int) -> dict[str, torch.Tensor] | None:
        """The `size` rows from `place` on, from the shard; None when the shard is past `place` (or ended)."""
        while (head := self._head()) is not None and head < place:  # rows of steps done before (a resume)
            self._pending = {name: column[self._pending["place"] >= place] for name, column in self._pending.items()}
        if head != place:
            return None
        parts = [self._pending]
        while sum(len(part["place"]) for part in parts) < size and (more := self._next()) is not None:
            parts.append(more)
        rows = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        if len(rows["place"]) < size or int(rows["place"][size - 1]) != place + size - 1:
            raise RuntimeError(f"rank {self.rank}'s Ray Data shard skipped rows after row {place} of the run")
        self._pending = {name: column[size:] for name, column in rows.items()}
        return {name: column[:size] for name, column in rows.items()}

    def _head(self) -> int | None:
        """The place of the next row the shard holds (fetching a batch when none is pending), None at its end."""
        while self._pending is None or not len(self._pending["place"]):
            self._pending = self._next()
            if self._pending is None:
                return None
        return int(self._pending["place"][0])

    def _next(self) -> dict[str, torch.Tensor] | None:
        if self._rows is None:
            self._rows = iter(
                self.shard.iter_torch_batches(
                    batch_size=self.shape.batch_per_rank,
                    prefetch_batches=PREFETCH_BATCHES,
                    device="cpu",  # copied into the step's buffer on the device by `batches`
                    pin_memory=self.device.type == "cuda",
                )
            )
        batch = next(self._rows, None)
        if batch is None:
            return None
        place = (batch["epoch"] - 1) * self.shape.used + batch["position"]
        return {"images": batch["images"], "labels": batch["labels"], "place": place}

    def _decode_here(self, epoch: int, start: int, size: int) -> dict[str, torch.Tensor]:
        """The batch read and decoded in this process: the images the shard would have brought."""
        slots = self.rank * self.shape.per_rank + np.arange(start, start + size)
        rows = decode_rows({"image": epoch_order(self.plan.count, self.plan.seed, epoch)[slots]}, self.plan)
        return {"images": torch.from_numpy(rows["images"]), "labels": torch.from_numpy(rows["labels"])}

    def evaluation_data(self) -> Dataset:
        """A fixed sample of the training and test images, decoded here once (the data is too large to hold)."""
        if self._evaluation is None:
            plan = self.plan
            train = self._sample("train", plan.count)
            test = self._sample("test", plan.test_count)
            self._evaluation = Dataset(plan.name, train, test, plan.class_names, plan.fingerprint, plan.kind)
        return self._evaluation

    def _sample(self, split: str, count: int) -> ImageSet:
        chosen = np.random.default_rng(EVAL_SAMPLE_SEED).permutation(count)[:EVAL_SAMPLE]
        rows = decode_rows({"image": np.sort(chosen)}, self.plan, split)
        labels = torch.from_numpy(rows["labels"]) if self.plan.class_names else None
        return ImageSet(torch.from_numpy(rows["images"]), labels, f"{len(chosen)}:sample-{self.plan.fingerprint}")


def load_data(config: TrainConfig) -> tuple[TrainConfig, Dataset, ImageSet]:
    """The run's dataset as the driver saw it (`job.storage.data_source.dataset_of`: a worker that finds other files
    fails), `config` with the data's shape and classes where the driver left them open (a run without one), and the
    training images (the first --limit)."""
    dataset = dataset_of(config)
    config = config.replace(
        resolution=dataset.resolution,
        channels=dataset.channels,
        num_classes=(config.num_classes or dataset.num_classes) if config.conditional else None,
    )
    train = dataset.train
    if config.limit is not None and config.limit < train.images.shape[0]:
        labels = train.labels[: config.limit] if train.labels is not None else None
        train = ImageSet(train.images[: config.limit], labels, limited_fingerprint(train, config.limit))
    return config, dataset, train


def limited_fingerprint(train: ImageSet, limit: int) -> str:
    """The fingerprint of the first `limit` images, as `gan.data.load_split(limit=...)` gives it."""
    return f"{limit}:{hashlib.sha256(train.images[:limit].contiguous().numpy().tobytes()).hexdigest()[:16]}"


def data_record(dataset: Dataset, train: ImageSet) -> dict:
    """What a run's model.json says of its data: the images it trained on, and its source's splits and shape."""
    return {
        "name": dataset.name,
        "fingerprint": train.fingerprint,
        "num_images": int(train.images.shape[0]),
        "source_fingerprint": dataset.fingerprint,
        "test_images": int(dataset.test.images.shape[0]),
        "shape": [dataset.channels, dataset.resolution, dataset.resolution],
        "classes": list(dataset.class_names),
    }
