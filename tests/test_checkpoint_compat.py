"""A checkpoint written by an older gan-job still loads and resumes (tests/fixtures/README.md)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch

from job.config import TrainConfig
from job.runtime.local_session import LocalSession
from job.storage.location import resolve_location
from job.runtime.loop import run_worker
from tests.conftest import metrics_rows, write_tiny_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "run-format2-stable.tar.xz"


def test_a_checkpoint_from_an_older_version_resumes(tmp_path):
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path, filter="data")
    data = write_tiny_dataset(tmp_path / "data")  # the same seed: the data the fixture was trained on
    config = TrainConfig(
        data="fashion-mnist", data_dir=str(data), epochs=2, noise_dim=1, recipe="stable", batch_size=32,
        eval_every=0, storage=str(tmp_path), run_name="stable", keep_checkpoints=1,
    )  # fmt: skip
    run_worker(config, LocalSession(resolve_location(str(tmp_path / "stable")), torch.device("cpu"), 1))

    rows = metrics_rows(tmp_path / "stable")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["resumed"] == {"from_epoch": 1, "from_step": 3, "world_size_before": 1}
    assert rows[1]["step"] == 6  # three more steps on top of the fixture's three
