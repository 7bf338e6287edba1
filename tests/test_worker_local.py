"""The per-worker loop in one process (no Ray): artifacts, checkpoints, resume, generate."""

import json
import pickle

import numpy as np
import pytest
import torch

from job.storage.checkpoint import STATE_FILE, CheckpointError, checkpoint_folders, read_checkpoint
from job.cli import main
from job.config import TrainConfig
from job.errors import UsageError
from job.runtime.local_session import LocalSession
from job.storage.location import resolve_location
from job.runtime.loop import run_worker


def _train(tmp_path, data_dir, **overrides):
    values = dict(data="fashion-mnist", data_dir=str(data_dir), epochs=2, batch_size=32, storage=str(tmp_path / "runs"), run_name="local", cpus_per_worker=1, eval_every=0)
    config = TrainConfig(**{**values, **overrides})
    run = resolve_location(config.storage).child(config.run_name)
    run_worker(config, LocalSession(run, torch.device("cpu"), config.keep_checkpoints))
    return run


def _metrics(run):
    return [json.loads(line) for line in (open(run.path + "/artifacts/metrics.jsonl"))]


def test_a_run_writes_every_artifact_and_a_complete_checkpoint(tmp_path, tiny_data_dir):
    run = _train(tmp_path, tiny_data_dir)
    artifacts = tmp_path / "runs" / "local" / "artifacts"
    for name in ("metrics.jsonl", "samples/epoch_001.png", "samples/epoch_002.png", "losses.png", "generator.pt", "model.json"):
        assert (artifacts / name).is_file(), name
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"epoch", "step", "loss_d", "loss_g", "d_real_prob", "d_fake_prob", "images_per_s", "epoch_time_s"} <= set(rows[0])
    state = read_checkpoint(checkpoint_folders(run)[0])
    assert state["epoch"] == 2 and state["step"] == rows[-1]["step"] == 6  # 96 images / 32 per step x 2 epochs
    assert {"generator", "discriminator", "optimizer_g", "optimizer_d", "fixed_noise", "rng", "config", "data_fingerprint"} <= set(state)
    model = json.loads((artifacts / "model.json").read_text())
    assert model["config"]["noise_dim"] == 100 and model["data"]["name"] == "fashion-mnist"
    generator_state = torch.load(artifacts / "generator.pt", weights_only=True)
    assert generator_state.keys() == state["generator"].keys()


def test_checkpoint_every_k_epochs_and_always_the_last(tmp_path, tiny_data_dir):
    run = _train(tmp_path, tiny_data_dir, epochs=5, checkpoint_every=2, keep_checkpoints=10)
    epochs = sorted(read_checkpoint(folder)["epoch"] for folder in checkpoint_folders(run))
    assert epochs == [2, 4, 5]


def test_resume_continues_from_the_stored_state_with_each_epoch_once(tmp_path, tiny_data_dir):
    run = _train(tmp_path, tiny_data_dir, epochs=2)
    first_rows = _metrics(run)
    state_after_2 = read_checkpoint(checkpoint_folders(run)[0])
    _train(tmp_path, tiny_data_dir, epochs=3)
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[:2] == first_rows
    assert rows[2]["step"] == state_after_2["step"] + 3  # continued counting, not from scratch


def test_resume_drops_epochs_that_were_never_checkpointed(tmp_path, tiny_data_dir):
    run = _train(tmp_path, tiny_data_dir, epochs=2)
    metrics_file = tmp_path / "runs" / "local" / "artifacts" / "metrics.jsonl"
    # A crash after epoch 3's line but before its checkpoint leaves this behind:
    metrics_file.write_text(metrics_file.read_text() + json.dumps({"epoch": 3, "step": 99}) + "\n")
    _train(tmp_path, tiny_data_dir, epochs=3)
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["step"] == 9


def test_resume_with_another_noise_dim_is_refused_naming_the_field(tmp_path, tiny_data_dir):
    _train(tmp_path, tiny_data_dir, epochs=1)
    with pytest.raises(UsageError, match="--noise-dim 100 \\(run\\) vs 64"):
        _train(tmp_path, tiny_data_dir, epochs=2, noise_dim=64)


def test_generate_writes_a_grid_and_all_images_as_npy(tmp_path, tiny_data_dir, capsys):
    _train(tmp_path, tiny_data_dir, epochs=1)
    grid, npy = tmp_path / "grid.png", tmp_path / "images.npy"
    assert main(["generate", "--from", str(tmp_path / "runs" / "local"), "--num", "70", "--out", str(grid), "--npy", str(npy)]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = np.load(npy)
    assert images.shape == (70, 28, 28) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1


def test_a_pickle_payload_in_place_of_a_checkpoint_is_refused_and_never_run(tmp_path, tiny_data_dir):
    run = _train(tmp_path, tiny_data_dir, epochs=1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = checkpoint_folders(run)[0]
    for dump in (lambda f: pickle.dump(Payload(), f), lambda f: torch.save({"x": Payload()}, f)):
        with open(folder.path + "/" + STATE_FILE, "wb") as handle:
            dump(handle)
        with pytest.raises(CheckpointError):
            read_checkpoint(folder)
        assert not marker.exists()


def test_training_time_evaluation_records_quality_and_plots_it(tmp_path, tiny_data_dir):
    run = _train(tmp_path, tiny_data_dir, epochs=2, eval_every=1, eval_num=64)
    rows = _metrics(run)
    for row in rows:
        quality = row["quality"]
        assert {"fid_classifier", "fid_classifier_floor", "modes_covered", "kl_to_uniform", "precision", "recall"} <= set(quality)
        assert 0 <= quality["modes_covered"] <= 10 and len(quality["class_histogram"]) == 10
    assert (tmp_path / "runs" / "local" / "artifacts" / "quality.png").is_file()


def test_ema_weights_are_checkpointed_and_become_the_model(tmp_path, tiny_data_dir):
    run = _train(tmp_path, tiny_data_dir, epochs=1, recipe="stable")
    state = read_checkpoint(checkpoint_folders(run)[0])
    assert state["config"]["ema_decay"] == 0.999 and state["config"]["beta1"] == 0.5
    generator_pt = torch.load(tmp_path / "runs" / "local" / "artifacts" / "generator.pt", weights_only=True)
    for name, value in generator_pt.items():
        assert torch.equal(value, state["ema_generator"][name])
    assert any(not torch.equal(state["ema_generator"][n], state["generator"][n]) for n in state["generator"])
