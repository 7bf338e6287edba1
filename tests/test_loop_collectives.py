"""The loop makes its collective calls itself, in one order, and times each part of an epoch (one process)."""

from __future__ import annotations

import torch

import job.runtime.loop
import job.runtime.quality
from job.config import TrainConfig
from job.runtime.local_session import LocalSession
from job.runtime.loop import run_worker
from job.runtime.state import TrainingState, rng_state
from job.storage.location import resolve_location
from tests.conftest import metrics_rows

BREAKDOWN = (
    "step_time_s", "evaluation_time_s", "sample_grid_time_s", "checkpoint_time_s", "artifacts_time_s", "report_time_s",
)  # fmt: skip


class Recording(LocalSession):
    """LocalSession that notes each report in the shared call log."""

    def __init__(self, run, calls: list[str]) -> None:
        super().__init__(run, torch.device("cpu"), keep_checkpoints=5)
        self.calls = calls

    def report(self, metrics, checkpoint) -> None:
        self.calls.append("report+checkpoint" if checkpoint is not None else "report")
        super().report(metrics, checkpoint)


def test_every_collective_call_is_made_by_the_loop_in_one_order(tmp_path, tiny_data_dir, monkeypatch):
    calls: list[str] = []

    def gather(value):
        calls.append("gather")
        return [value]

    def broadcast(value):
        calls.append("broadcast")
        return value

    monkeypatch.setattr(job.runtime.loop, "gather_objects", gather)
    monkeypatch.setattr(job.runtime.loop, "broadcast_object", broadcast)
    planted = {"modes_covered": 10, "fid_classifier": 1.0, "fid_classifier_floor": 1.0}
    monkeypatch.setattr(job.runtime.quality.QualityProbe, "evaluate", lambda self, generator: planted)
    config = TrainConfig(
        data="fashion-mnist", data_dir=str(tiny_data_dir), epochs=3, batch_size=32, storage=str(tmp_path),
        run_name="order", cpus_per_worker=1, eval_every=2, checkpoint_every=2,
    )  # fmt: skip
    run_worker(config, Recording(resolve_location(str(tmp_path)).child("order"), calls))
    assert calls == [
        "report",  # epoch 1: no evaluation, no checkpoint
        "broadcast", "gather", "report+checkpoint",  # epoch 2: evaluation, then the RNG gather of its checkpoint
        "broadcast", "gather", "report+checkpoint",  # epoch 3, the last: both again
        "gather", "gather",  # the end: parameter digests, then nodes
    ]  # fmt: skip


def test_each_metrics_row_says_where_its_epochs_time_went(tmp_path, tiny_data_dir):
    config = TrainConfig(
        data="fashion-mnist", data_dir=str(tiny_data_dir), epochs=2, batch_size=32, storage=str(tmp_path),
        run_name="parts", cpus_per_worker=1, eval_every=0,
    )  # fmt: skip
    run_worker(config, LocalSession(resolve_location(str(tmp_path)).child("parts"), torch.device("cpu")))
    rows = metrics_rows(tmp_path / "parts")
    for row in rows:  # no evaluation in this run: the other parts, each a number of seconds
        assert all(isinstance(row[part], float) and row[part] >= 0 for part in BREAKDOWN[:1] + BREAKDOWN[2:])
        assert "evaluation_time_s" not in row and row["step_time_s"] == row["epoch_time_s"]


def test_a_checkpoint_snapshot_keeps_its_values_while_training_changes_the_weights(tiny_data_dir):
    config = TrainConfig(data="fashion-mnist", data_dir=str(tiny_data_dir), storage="/unused", run_name="snap")
    state = TrainingState.build(config, "fingerprint", 0, 1, torch.device("cpu"))
    weight = next(iter(state.generator.parameters()))
    snapshot = state.checkpoint([rng_state()])
    before = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # as the next step would, in place
    stored = snapshot.wait()["generator"]
    name = next(iter(state.generator.state_dict()))
    assert torch.equal(stored[name], before) and not torch.equal(stored[name], weight)
