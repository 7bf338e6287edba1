"""Training on the shared local Ray cluster: 2 CPU workers with DDP, checkpoints, resume."""

import importlib
import json
import math

import pytest

import job.runtime.driver
import job.runtime.ray_session
from job.cli import main
from job.storage.checkpoint import checkpoint_folders, read_checkpoint
from job.storage.location import resolve_location
from tests.conftest import TWO_EPOCH_ARTIFACTS, metrics_rows

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, fashion_mnist_dir, tmp_path_factory):
    """2 workers, 2 epochs, the first 1,000 real Fashion-MNIST images."""
    storage = tmp_path_factory.mktemp("ray-runs")
    argv = [
        "train", "--data", "fashion-mnist", "--data-dir", str(fashion_mnist_dir), "--limit", "1000",
        "--epochs", "2", "--num-workers", "2", "--storage", str(storage), "--run-name", "ddp", "--eval-every", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    return argv, storage / "ddp"


def test_two_worker_run_writes_checkpoints_and_every_artifact(two_worker_run):
    _, run = two_worker_run
    assert any(p.name.startswith("checkpoint_") and (p / "state.pt").is_file() for p in run.iterdir())
    for name in TWO_EPOCH_ARTIFACTS:
        assert (run / "artifacts" / name).is_file(), name
    assert [row["epoch"] for row in metrics_rows(run)] == [1, 2]


def test_ddp_keeps_both_ranks_parameters_identical(two_worker_run):
    _, run = two_worker_run
    digests = json.loads((run / "artifacts" / "model.json").read_text())["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_global_batch_is_split_across_workers(two_worker_run):
    _, run = two_worker_run
    # 1,000 images over 2 ranks is 500 each; 256 global is 128 per rank: 4 steps an epoch.
    assert [row["step"] for row in metrics_rows(run)] == [4, 8]


def test_same_run_name_resumes_at_epoch_3_from_the_stored_state(two_worker_run):
    argv, run = two_worker_run
    before = metrics_rows(run)
    epochs = argv.index("--epochs") + 1
    assert main([*argv[:epochs], "3", *argv[epochs + 1 :]]) == 0
    rows = metrics_rows(run)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[:2] == before
    assert rows[2]["step"] == 12  # went on from step 8
    latest = read_checkpoint(checkpoint_folders(resolve_location(str(run)))[0])
    assert latest["epoch"] == 3 and latest["step"] == 12


def test_a_rollback_on_two_workers_retrains_the_epoch_once_and_keeps_the_ranks_in_sync(
    ray_cluster, fashion_mnist_dir, tmp_path, monkeypatch
):
    """A non-finite loss in epoch 2 on both ranks (4 steps an epoch): roll back to epoch 1's checkpoint,
    train epoch 2 again."""
    real_loop = job.runtime.ray_session.train_loop_per_worker

    def loop_with_nan_in_epoch_2(config: dict) -> None:
        # Runs on each Ray worker (Ray pickles this nested function by value): plant the NaN there.
        step_module = importlib.import_module("gan.step")
        real_loss, calls = step_module.generator_loss, [0]

        def planted(fake_logits):
            calls[0] += 1
            return real_loss(fake_logits) * math.nan if 5 <= calls[0] <= 8 else real_loss(fake_logits)

        step_module.generator_loss = planted
        real_loop(config)

    # The driver hands Ray whichever function job.runtime.driver finds under this name.
    monkeypatch.setattr(job.runtime.ray_session, "train_loop_per_worker", loop_with_nan_in_epoch_2)
    monkeypatch.setattr(job.runtime.driver, "train_loop_per_worker", loop_with_nan_in_epoch_2)
    argv = [
        "train", "--data", "fashion-mnist", "--data-dir", str(fashion_mnist_dir), "--limit", "256",
        "--batch-size", "64", "--epochs", "3", "--num-workers", "2", "--storage", str(tmp_path),
        "--run-name", "rolled", "--eval-every", "0", "--on-divergence", "rollback",
    ]  # fmt: skip
    assert main(argv) == 0

    rows = metrics_rows(tmp_path / "rolled")
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # epoch 2 once: its first try was dropped
    assert rows[1]["after_rollback"]["diverged_at_epoch"] == 2 and rows[1]["after_rollback"]["resumed_from_epoch"] == 1
    assert "non-finite" in rows[1]["after_rollback"]["cause"]
    assert all(math.isfinite(r["loss_g"]) for r in rows) and not any("guard" in r for r in rows)
    assert [r["step"] for r in rows] == [
        4,
        8,
        12,
    ]  # 256 images, 32 a step on each of 2 ranks; the NaN steps not counted
    digests = json.loads((tmp_path / "rolled" / "artifacts" / "model.json").read_text())["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
