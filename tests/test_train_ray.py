"""Training on the shared local Ray cluster: 2 CPU workers with DDP, checkpoints, resume."""

import json
from pathlib import Path

import pytest

from job.storage.checkpoint import checkpoint_folders, read_checkpoint
from job.cli import main
from job.storage.location import resolve_location

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


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "artifacts" / "metrics.jsonl").read_text().splitlines()]


def test_two_worker_run_writes_checkpoints_and_every_artifact(two_worker_run):
    _, run = two_worker_run
    assert any(p.name.startswith("checkpoint_") and (p / "state.pt").is_file() for p in run.iterdir())
    for name in ("metrics.jsonl", "samples/epoch_001.png", "samples/epoch_002.png", "losses.png", "generator.pt", "model.json"):
        assert (run / "artifacts" / name).is_file(), name
    assert [row["epoch"] for row in _rows(run)] == [1, 2]


def test_ddp_keeps_both_ranks_parameters_identical(two_worker_run):
    _, run = two_worker_run
    digests = json.loads((run / "artifacts" / "model.json").read_text())["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_global_batch_is_split_across_workers(two_worker_run):
    _, run = two_worker_run
    # 1,000 images over 2 ranks is 500 each; 256 global is 128 per rank: 4 steps an epoch.
    assert [row["step"] for row in _rows(run)] == [4, 8]


def test_same_run_name_resumes_at_epoch_3_from_the_stored_state(two_worker_run):
    argv, run = two_worker_run
    before = _rows(run)
    epochs = argv.index("--epochs") + 1
    assert main([*argv[:epochs], "3", *argv[epochs + 1 :]]) == 0
    rows = _rows(run)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[:2] == before
    assert rows[2]["step"] == 12  # went on from step 8
    latest = read_checkpoint(checkpoint_folders(resolve_location(str(run)))[0])
    assert latest["epoch"] == 3 and latest["step"] == 12
