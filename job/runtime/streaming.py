"""Images that do not fit a worker's memory, streamed through Ray Data: read and decoded in Ray Data's tasks while
the workers train, in an order that is a function of the seed and the epoch alone.

The trainer is given `datasets={"train": run_rows(epochs x images)}`, one row per image of each epoch (as ranges),
and `epoch_shards(plan)` as its DataConfig. Instead of Ray's `streaming_split` (whose assignment of rows to ranks
changes from run to run, and whose `equal=True` drops rows unsaid), each rank gets the rows of its own shard: the
epoch's permutation (`gan.data.shard_indices`'s), cut by `gan.epoch.EpochShape` as the in-memory path cuts it, from
the position the run resumes at, mapped to their images and decoded (`decode_rows`) with order preserved. Each worker
iterates `get_dataset_shard("train").iter_torch_batches(...)` once, across all its epochs, with batches prefetched
(`job.runtime.feed.StreamFeed`). Why: docs/data.md#streaming
"""

from __future__ import annotations

import functools
import posixpath
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from gan.data import DataError, epoch_permutation
from gan.epoch import EpochShape
from gan.datasets import read_image_file
from gan.images import ImageError, decode
from job.config import TrainConfig
from job.storage.checkpoint import latest_checkpoint_or_refuse
from job.storage.data_source import mirror_prefix, stream_listing
from job.storage.location import is_s3, resolve_location, split_s3_uri
from job.storage.retry import retried
from job.storage.s3 import s3_client

PREFETCH_BATCHES = 4  # batches each worker keeps decoded ahead of its step
DECODE_TASKS = 2  # decoding tasks at once for each worker; they reserve no CPU (the workers hold them all)
BLOCK_PER_RANK = 512  # images of each rank in one block of the run's rows: what one decoding task decodes
NODE_LABEL = "ray.io/node-id"  # the label Ray gives each node: its id


@dataclass(frozen=True)
class StreamPlan:
    """What every process of a streamed run needs to cut and decode the same batches."""

    train: Any  # ObjectRef of the training images' [(path, label), ...] (after --limit), in the listing's order
    test: Any  # ObjectRef of the test images' [(path, label), ...]
    count: int  # training images
    test_count: int
    kind: str  # "folder" or "zip"
    root: str  # the folder, the ZIP, or the s3://bucket/prefix the images are read from
    s3_endpoint: str | None
    resolution: int
    channels: int
    class_names: tuple[str, ...]
    fingerprint: str  # the data's, as the run records it (its listing's and shape)
    seed: int
    epochs: int
    batch_size: int  # global
    multiple: int  # an epoch's images are a multiple of this (`TrainConfig.shard_multiple`)
    run: str  # the run's location (`<storage>/<run-name>`): where a restart's position is read
    name: str  # --data as given

    def shape(self, world_size: int) -> EpochShape:
        return EpochShape(self.count, world_size, self.multiple, self.batch_size // world_size)


def stream_inputs(config: TrainConfig, run_uri: str) -> tuple[dict, Any, StreamPlan]:
    """The trainer's `datasets` and `dataset_config` for a streamed run, and its plan (for the workers): the data
    listed again as the driver checked it (files newer than the run's cutoff left out; another fingerprint is
    refused), its member lists put in the object store."""
    import ray
    from ray.data import DataContext

    listing = stream_listing(config.data, config.s3_endpoint, config.data_cutoff_ns)
    fingerprint = f"{listing.fingerprint}-r{config.resolution}-c{config.channels}"
    if fingerprint != config.data_fingerprint:
        raise DataError(
            f"--data {config.data} changed as the run started: it had fingerprint {config.data_fingerprint}, now "
            f"{fingerprint} (an image was replaced or removed); run again"
        )
    train = [(m.path, m.label) for m in listing.members if m.split == "train"][: config.limit]
    test = [(m.path, m.label) for m in listing.members if m.split == "test"]
    plan = StreamPlan(
        ray.put(train),
        ray.put(test),
        len(train),
        len(test),
        listing.kind,
        config.data,
        config.s3_endpoint,
        config.resolution,
        config.channels,
        listing.class_names,
        fingerprint,
        config.seed,
        config.epochs,
        config.batch_size,
        config.shard_multiple,
        run_uri,
        config.data,
    )
    context = DataContext.get_current()  # what Ray Train hands to its workers
    context.enable_progress_bars = False  # one line per epoch is the run's report, not a bar per worker
    context.print_on_execution_start = False
    return {"train": run_rows(config.epochs * len(train), config.num_workers)}, epoch_shards(plan), plan


def run_rows(rows: int, world_size: int):  # -> ray.data.Dataset
    """The run's rows 0..rows-1 as (start, stop) ranges, one block each of about BLOCK_PER_RANK images per rank, held
    in the object store. A block is what a Ray Data task takes, so its size sets how finely the decoding is cut and
    spread over DECODE_TASKS; and unlike `ray.data.range`'s read tasks, which each want a CPU, nothing here waits for
    one that the workers hold."""
    import ray

    size = BLOCK_PER_RANK * world_size
    ranges = [{"start": start, "stop": min(start + size, rows)} for start in range(0, rows, size)]
    return ray.data.from_items(ranges, override_num_blocks=len(ranges))


def epoch_shards(plan: StreamPlan):  # -> ray.train.DataConfig
    """A DataConfig whose `configure` gives each rank its own rows of the run, from where the run resumes."""
    from ray.train import DataConfig

    class EpochShards(DataConfig):
        """Each rank's shard of the run's rows, decoded in order (see the module's docstring)."""

        def __init__(self, plan: StreamPlan) -> None:
            super().__init__(datasets_to_split=[])  # the split is ours: Ray Train then asks once per worker group
            self.plan = plan

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs) -> list[dict]:
            start = resume_position(self.plan)
            nodes = worker_node_ids or [None] * world_size
            return [
                {"train": rank_rows(self.plan, datasets["train"], rank, world_size, start, nodes[rank]).iterator()}
                for rank in range(world_size)
            ]

    return EpochShards(plan)


def rank_rows(plan: StreamPlan, rows, rank: int, world_size: int, start: tuple[int, int], node: str | None):
    """Rank `rank`'s rows of `rows` from (epoch, step) `start` on, as decoded images, in order: each block of the
    run's rows selected and decoded by one task, DECODE_TASKS at once, on the worker's node (`node`) where it has
    room, so that images do not cross the network twice."""
    from ray.data import TaskPoolStrategy

    placement = {"label_selector": {NODE_LABEL: node}, "fallback_strategy": [{"label_selector": {}}]} if node else {}
    decoded = rows.map_batches(
        select_and_decode,
        fn_kwargs={"plan": plan, "rank": rank, "shape": plan.shape(world_size), "start": start},
        batch_size=None,  # a whole block: one range of the run's rows
        batch_format="numpy",
        num_cpus=0,
        compute=TaskPoolStrategy(size=DECODE_TASKS),  # the bound on decoding tasks, since they reserve no CPU
        **placement,
    )
    decoded.context.execution_options.preserve_order = True  # order is what makes two runs alike
    return decoded


def select_and_decode(
    batch: dict, plan: StreamPlan, rank: int, shape: EpochShape, start: tuple[int, int]
) -> Iterator[dict]:
    """The block's rows of this rank, decoded; nothing for a block with none (a resumed run's earlier rows): an
    empty batch of images is one Ray Data cannot put into Arrow, and would pickle instead."""
    rows = select_rows(batch, plan, rank, shape, start)
    if len(rows["image"]):
        yield decode_rows(rows, plan)


def select_rows(batch: dict, plan: StreamPlan, rank: int, shape: EpochShape, start: tuple[int, int]) -> dict:
    """Of the run's rows in the batch's ranges, those this rank trains on from (epoch, step) `start` on: their epoch,
    position in the rank's shard, and image (an index into the training images). Row (epoch - 1) x count + j is
    position j // world_size of rank j % world_size, so a range of k x world_size rows holds k positions of each
    rank, whatever its rank; positions past the shape's `used` are no rank's."""
    ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(batch["start"], batch["stop"])])
    epochs, within = ids // plan.count + 1, ids % plan.count
    positions = within // shape.world_size
    mine = (within % shape.world_size == rank) & (positions < shape.used)
    later = (epochs > start[0]) | ((epochs == start[0]) & (positions >= start[1] * shape.batch_per_rank))
    keep = mine & later & (epochs <= plan.epochs)
    epochs, positions = epochs[keep], positions[keep]
    slots = rank * shape.per_rank + positions  # the rank's shard of the epoch's order, as gan.data.shard_indices cuts
    images = np.empty(len(slots), dtype=np.int64)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        images[where] = epoch_order(plan.count, plan.seed, int(epoch))[slots[where]]
    return {"epoch": epochs, "position": positions, "image": images}


@functools.lru_cache(maxsize=4)
def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the training images (`gan.data.epoch_permutation`), kept for the epoch's blocks."""
    return epoch_permutation(count, epoch, seed).numpy()


def decode_rows(batch: dict, plan: StreamPlan, split: str = "train") -> dict:
    """The rows' images read and decoded by `gan.images`' rules (those the packed form is made by), as uint8
    (N, C, R, R), with their labels (-1: unlabelled); the rows' other columns kept."""
    members = members_of(plan, split)
    read = reader(plan.kind, plan.root, plan.s3_endpoint)
    images = np.zeros((len(batch["image"]), plan.channels, plan.resolution, plan.resolution), dtype=np.uint8)
    for row, index in enumerate(batch["image"]):
        path = members[index][0]
        try:
            images[row] = decode(read(path), f"{plan.name}: {path}", plan.resolution, plan.channels)
        except ImageError as err:
            raise DataError(str(err)) from None
    labels = np.array([members[index][1] for index in batch["image"]], dtype=np.int64)
    return {**batch, "images": images, "labels": labels}


_members: dict[bytes, list] = {}


def members_of(plan: StreamPlan, split: str) -> list:
    """A split's member list, fetched once per process from the object store."""
    import ray

    ref = plan.train if split == "train" else plan.test
    key = ref.binary()
    if key not in _members:
        _members[key] = ray.get(ref)
    return _members[key]


@functools.lru_cache(maxsize=4)
def reader(kind: str, root: str, s3_endpoint: str | None) -> Callable[[str], bytes]:
    """How this process reads one member's bytes: a file of the folder, an object under the prefix (a GET, retried
    as every storage call is), or a member of the ZIP (a bucket's ZIP from this node's copy)."""
    if kind == "zip":
        where = Path(root) if not is_s3(root) else mirror_prefix(root, s3_endpoint)
        archive = zipfile.ZipFile(where if where.is_file() else next(where.glob("*.zip")))
        return archive.read
    if is_s3(root):
        bucket, prefix = split_s3_uri(root, "--data")
        client = s3_client(s3_endpoint)

        def get(path: str) -> bytes:
            key = posixpath.join(prefix, path) if prefix else path
            return retried(
                lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(), f"reading s3://{bucket}/{key}"
            )

        return get
    folder = Path(root)
    return lambda path: read_image_file(folder / path, root)


def resume_position(plan: StreamPlan) -> tuple[int, int]:
    """(epoch, step) the run goes on from: the epoch its newest checkpoint had not finished and the steps of it that
    checkpoint had done; (1, 0) for a run with none. A worker that resumes elsewhere decodes the gap itself."""
    found = latest_checkpoint_or_refuse(resolve_location(plan.run, plan.s3_endpoint), "run")
    if found is None:
        return 1, 0
    return found[1]["epoch"] + 1, int(found[1].get("epoch_step", 0))
