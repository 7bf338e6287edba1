"""Epochs cut by one rule whether the images are held or streamed, and a run that resumes inside an epoch
(--checkpoint-every-steps), in one process (no Ray): the in-memory path's half of the streaming issue."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gan.step
from gan.epoch import STAT_NAMES, EpochShape, index_batches
from job.storage.checkpoint import checkpoint_folders, read_checkpoint
from job.storage.checkpoint_schema import CheckpointError, check_contents
from job.storage.location import resolve_location
from tests.conftest import metrics_rows, train_one_process


def test_every_rank_steps_alike_and_what_no_rank_trains_on_is_counted():
    # 322 images over 2 ranks: 161 each, 5 batches of 32 and one image that BatchNorm cannot train on alone.
    shape = EpochShape(num_images=322, world_size=2, multiple=2, batch_per_rank=32)
    assert (shape.per_rank, shape.used, shape.steps, shape.dropped) == (161, 160, 5, 2)
    assert shape.batch_at(4) == (128, 32)
    # An odd image count under an elastic multiple of 6: the tail no world size could split is dropped too.
    odd = EpochShape(num_images=101, world_size=3, multiple=6, batch_per_rank=10)
    assert (odd.per_rank, odd.steps, odd.dropped) == (32, 4, 5) and odd.batch_at(3) == (30, 2)
    sizes = [len(batch) for batch in index_batches(torch.arange(odd.per_rank), odd)]
    assert sizes == [10, 10, 10, 2]


def _interrupted_at_generator_loss(monkeypatch, call: int):
    """Raise on the `call`-th generator loss of this process (one per step): a worker dying mid-epoch."""
    real, calls = gan.step.generator_loss, [0]

    def failing(fake_logits):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("planted: the worker died here")
        return real(fake_logits)

    monkeypatch.setattr(gan.step, "generator_loss", failing)


def _trained(storage: Path, data_dir: Path, name: str, **overrides) -> Path:
    """2 epochs of 3 steps (96 tiny images, batch 32), the stable recipe (EMA on: more state to restore)."""
    return train_one_process(storage, data_dir, name, epochs=2, recipe="stable", **overrides)


def test_a_run_stopped_inside_an_epoch_resumes_at_its_step_and_ends_bitwise_as_the_uninterrupted_one(
    tmp_path, tiny_data_dir, monkeypatch
):
    straight = _trained(tmp_path, tiny_data_dir, "straight")
    with monkeypatch.context() as patch:
        _interrupted_at_generator_loss(patch, call=6)  # epoch 2's third step: its checkpoints after steps 1 and 2
        with pytest.raises(RuntimeError, match="planted"):
            _trained(tmp_path, tiny_data_dir, "stopped", checkpoint_every_steps=1)
    newest = read_checkpoint(checkpoint_folders(resolve_location(str(tmp_path / "stopped")))[0])
    assert (newest["epoch"], newest["epoch_step"], newest["step"]) == (1, 2, 5)
    resumed = _trained(tmp_path, tiny_data_dir, "stopped", checkpoint_every_steps=1)

    ends = [read_checkpoint(checkpoint_folders(resolve_location(str(run)))[0]) for run in (straight, resumed)]
    for name in ("generator", "discriminator", "ema_generator"):
        for key, value in ends[0][name].items():
            assert torch.equal(value, ends[1][name][key]), (name, key)
    assert ends[1]["step"] == 6 and "epoch_step" not in ends[1]  # an epoch's end is a plain checkpoint
    rows = [metrics_rows(run) for run in (straight, resumed)]
    assert [row["epoch"] for row in rows[1]] == [1, 2]  # epoch 2 once
    assert rows[1][1]["resumed"]["from_epoch_step"] == 2
    # The epoch's stats are the means over all its steps, those before the stop and those after.
    assert [[row[name] for name in STAT_NAMES] for row in rows[0]] == [
        [row[name] for name in STAT_NAMES] for row in rows[1]
    ]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"epoch_step": 0}, "epoch_step"),
        ({"epoch_step": "2"}, "epoch_step"),
        ({"epoch_sums": [torch.zeros(4)]}, "epoch_step"),  # sums with no position
        ({"epoch_step": 2, "epoch_sums": [torch.zeros(2, 2)]}, "epoch_step"),
    ],
)
def test_a_checkpoint_whose_position_in_the_epoch_is_damaged_is_refused(change, named, tmp_path, tiny_data_dir):
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "one")
    state = read_checkpoint(checkpoint_folders(resolve_location(str(run)))[0])
    with pytest.raises(CheckpointError, match=named):
        check_contents({**state, **change}, "planted")
