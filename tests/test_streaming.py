"""A folder of images streamed through Ray Data (--data-loading stream) on the shared local Ray cluster, 2 workers:
the same training as the in-memory path, bitwise; a worker that dies inside an epoch is replaced and the run goes on
from its last checkpoint in the epoch, and ends as the uninterrupted run; `auto`'s rule; the refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

import job.runtime.driver
import job.runtime.ray_session
from gan.data import load_split
from job.cli import main
from job.config import TrainConfig
from job.runtime.data_loading import MEMORY_SHARE, WORKER_MEMORY_VARIABLE, stream_settings
from tests.conftest import metrics_rows

TRAIN_IMAGES = 322  # 161 a rank: 5 batches of 32, and one image no rank trains on alone


@pytest.fixture(scope="module")
def png_folder(small_fashion_dir, tmp_path_factory) -> Path:
    """Real Fashion-MNIST images as PNGs in train/<class>/ and test/<class>/ folders."""
    root = tmp_path_factory.mktemp("fashion-png")
    for split, count in (("train", TRAIN_IMAGES + 8), ("test", 40)):
        images = load_split(small_fashion_dir, split, count)
        for i in range(count):
            folder = root / split / f"class_{int(images.labels[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images.images[i, 0].numpy(), "L").save(folder / f"{i:04d}.png")
    return root


def train_argv(data: Path, storage: Path, name: str, loading: str, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--data-loading", loading, "--limit", str(TRAIN_IMAGES), "--epochs", "2",
        "--batch-size", "64", "--num-workers", "2", "--cpus-per-worker", "1", "--eval-every", "0",
        "--storage", str(storage), "--run-name", name, *extra,
    ]  # fmt: skip


def param_digests(run: Path) -> list[str]:
    return json.loads((run / "artifacts" / "model.json").read_text())["param_digests"]


@pytest.fixture(scope="module")
def streamed_run(ray_cluster, png_folder, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("stream-runs")
    assert main(train_argv(png_folder, storage, "streamed", "stream")) == 0
    return storage / "streamed"


@pytest.mark.ray
def test_a_streamed_run_trains_bitwise_as_the_same_run_with_its_images_in_memory(streamed_run, png_folder, tmp_path):
    assert main(train_argv(png_folder, tmp_path, "in-memory", "memory")) == 0
    rows = {name: metrics_rows(run) for name, run in (("stream", streamed_run), ("memory", tmp_path / "in-memory"))}
    assert [row["data_loading"] for row in rows["stream"]] == ["stream", "stream"]
    assert [row["data_loading"] for row in rows["memory"]] == ["memory", "memory"]
    for loading in ("stream", "memory"):  # 5 full steps on each rank, every epoch; the 2 images left are counted
        assert [(row["step"], row["dropped_images"]) for row in rows[loading]] == [(5, 2), (10, 2)]
    streamed, held = param_digests(streamed_run), param_digests(tmp_path / "in-memory")
    assert streamed[0] == streamed[1] and streamed == held


@pytest.mark.ray
def test_a_worker_that_dies_inside_an_epoch_is_replaced_and_the_run_ends_as_the_uninterrupted_one(
    streamed_run, png_folder, tmp_path, monkeypatch
):
    """Rank 1 exits in epoch 2's last step (checkpoints after its steps 2 and 4): Ray Train restarts the worker group,
    which goes on from the newest checkpoint stored (step 4, or step 2 if step 4's was still being written), each
    rank's shard started there."""
    marker = tmp_path / "died"
    real_loop = job.runtime.ray_session.train_loop_per_worker

    def loop_that_dies_once(config: dict) -> None:
        import importlib  # runs on each Ray worker (pickled by value): plants the death there

        import ray.train

        step_module = importlib.import_module("gan.step")
        real_loss, calls = step_module.generator_loss, [0]

        def dying(fake_logits):
            calls[0] += 1
            if calls[0] == 10 and ray.train.get_context().get_world_rank() == 1 and not marker.exists():
                marker.touch()
                os._exit(1)
            return real_loss(fake_logits)

        step_module.generator_loss = dying
        real_loop(config)

    monkeypatch.setattr(job.runtime.driver, "train_loop_per_worker", loop_that_dies_once)
    argv = train_argv(png_folder, tmp_path, "killed", "stream", "--checkpoint-every-steps", "2")
    assert main(argv) == 0

    assert marker.exists()  # it did die
    rows = metrics_rows(tmp_path / "killed")
    assert [row["epoch"] for row in rows] == [1, 2] and rows[1]["step"] == 10  # epoch 2 once, all its steps
    assert rows[1]["resumed"]["from_epoch"] == 1 and rows[1]["resumed"]["from_epoch_step"] in (2, 4)
    assert param_digests(tmp_path / "killed") == param_digests(streamed_run)


def test_auto_streams_only_when_the_packed_images_would_pass_the_share_of_a_workers_memory(
    png_folder, monkeypatch, capsys
):
    config = TrainConfig(data=str(png_folder), limit=TRAIN_IMAGES, data_loading="auto")
    packed = TRAIN_IMAGES * 28 * 28
    monkeypatch.setenv(WORKER_MEMORY_VARIABLE, str(int(packed / MEMORY_SHARE)))  # just fits
    assert stream_settings(config) is None
    monkeypatch.setenv(WORKER_MEMORY_VARIABLE, str(int(packed / MEMORY_SHARE) - 1))
    settings = stream_settings(config)
    assert settings["data_loading"] == "stream" and (settings["resolution"], settings["channels"]) == (28, 1)
    line = capsys.readouterr().out.strip()
    assert f"{TRAIN_IMAGES:,} training images, 10 classes, 1x28x28; streamed through Ray Data" in line
    assert "more than 25% of a worker's" in line


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "--data", "fashion-mnist", "--data-loading", "stream"], "--data-loading stream reads a folder"),
        (["tune", "--data", "fashion-mnist", "--sweep", "s", "--checkpoint-every-steps", "5"], "--checkpoint-every-"),
        (["train", "--checkpoint-every-steps", "0"], "--checkpoint-every-steps"),
    ],
)
def test_what_cannot_stream_or_checkpoint_inside_an_epoch_is_refused_in_one_line(
    argv, named, fashion_mnist_dir, tmp_path, capsys
):
    status = main([*argv, "--data-dir", str(fashion_mnist_dir), "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "runs").exists()
