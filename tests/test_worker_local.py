"""The per-worker loop in one process (no Ray): artifacts, checkpoints, resume, generate."""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from job.cli import main
from job.errors import UsageError
from job.config import TrainConfig
from job.runtime.state import TrainingState
from job.storage.checkpoint import STATE_FILE, checkpoint_folders, read_checkpoint
from job.storage.checkpoint_schema import REQUIRED_KEYS, CheckpointError
from job.storage.location import resolve_location
from tests.conftest import TWO_EPOCH_ARTIFACTS, metrics_rows, train_one_process


def _train(tmp_path, data_dir, run_name="local", **overrides):
    """A run of 2 epochs (3 steps each on the tiny data) in this process; its Location."""
    folder = train_one_process(tmp_path / "runs", data_dir, run_name, **{"epochs": 2, **overrides})
    return resolve_location(str(folder))


def _metrics(run):
    return metrics_rows(Path(run.path))


def test_a_run_writes_every_artifact_and_a_complete_checkpoint(tmp_path, tiny_data_dir):
    run = _train(tmp_path, tiny_data_dir)
    artifacts = tmp_path / "runs" / "local" / "artifacts"
    for name in TWO_EPOCH_ARTIFACTS:
        assert (artifacts / name).is_file(), name
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"epoch", "step", "loss_d", "loss_g", "d_real_prob", "d_fake_prob", "images_per_s", "epoch_time_s"} <= set(
        rows[0]
    )
    state = read_checkpoint(checkpoint_folders(run)[0])
    assert state["epoch"] == 2 and state["step"] == rows[-1]["step"] == 6  # 96 images / 32 per step x 2 epochs
    assert set(state) == set(REQUIRED_KEYS)  # the keys of format 2, no more: older readers load it too
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
    assert (
        main(
            [
                "generate",
                "--from",
                str(tmp_path / "runs" / "local"),
                "--num",
                "70",
                "--out",
                str(grid),
                "--npy",
                str(npy),
            ]
        )
        == 0
    )
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
        assert {
            "fid_classifier",
            "fid_classifier_floor",
            "modes_covered",
            "kl_to_uniform",
            "precision",
            "recall",
        } <= set(quality)
        assert 0 <= quality["modes_covered"] <= 10 and len(quality["class_histogram"]) == 10
    assert (tmp_path / "runs" / "local" / "artifacts" / "quality.png").is_file()


def test_ema_weights_are_checkpointed_and_become_the_model(tmp_path, tiny_data_dir):
    run = _train(tmp_path, tiny_data_dir, epochs=1, recipe="stable")
    state = read_checkpoint(checkpoint_folders(run)[0])
    assert state["config"]["ema_decay"] == 0.999 and state["config"]["beta1"] == 0.5
    assert set(state) == {*REQUIRED_KEYS, "ema_generator", "ema_updates"}
    generator_pt = torch.load(tmp_path / "runs" / "local" / "artifacts" / "generator.pt", weights_only=True)
    for name, value in generator_pt.items():
        assert torch.equal(value, state["ema_generator"][name])
    assert any(not torch.equal(state["ema_generator"][n], state["generator"][n]) for n in state["generator"])


def _state_digest(*state_dicts: dict) -> str:
    """sha256 over the names and exact bytes of every tensor in `state_dicts`."""
    digest = hashlib.sha256()
    for state_dict in state_dicts:
        for name in sorted(state_dict):
            digest.update(name.encode())
            digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_one_epoch_then_a_resumed_epoch_is_bitwise_two_epochs_in_one_go(tmp_path, tiny_data_dir):
    """Resume restores everything the next epoch depends on: weights, optimizers, EMA, RNG, position."""
    in_one_go = _train(tmp_path, tiny_data_dir, run_name="in-one-go", epochs=2, recipe="stable")
    _train(tmp_path, tiny_data_dir, run_name="resumed", epochs=1, recipe="stable")
    resumed = _train(tmp_path, tiny_data_dir, run_name="resumed", epochs=2, recipe="stable")

    states = [read_checkpoint(checkpoint_folders(run)[0]) for run in (in_one_go, resumed)]
    digests = [_state_digest(s["generator"], s["discriminator"], s["ema_generator"]) for s in states]
    print(f"\nG+D+EMA sha256 after 2 epochs: in one go {digests[0]}, 1 + resumed 1 {digests[1]}")
    assert metrics_rows(Path(resumed.path))[1]["resumed"]["from_epoch"] == 1  # it really resumed
    assert states[0]["epoch"] == states[1]["epoch"] == 2 and states[0]["step"] == states[1]["step"] == 6
    assert digests[0] == digests[1]
    for name in ("optimizer_g", "optimizer_d"):
        for param, moments in states[0][name]["state"].items():
            for key, value in moments.items():
                assert torch.equal(value, states[1][name]["state"][param][key]), (name, param, key)


def test_a_conditional_run_resumed_after_one_epoch_is_bitwise_two_epochs_in_one_go(tmp_path, tiny_data_dir):
    """The labels' path (and G's drawn fake labels) resumes as exactly as the unconditional one
    (--recipe conditional)."""
    in_one_go = _train(tmp_path, tiny_data_dir, run_name="in-one-go", epochs=2, recipe="conditional")
    _train(tmp_path, tiny_data_dir, run_name="resumed", epochs=1, recipe="conditional")
    resumed = _train(tmp_path, tiny_data_dir, run_name="resumed", epochs=2, recipe="conditional")

    states = [read_checkpoint(checkpoint_folders(run)[0]) for run in (in_one_go, resumed)]
    assert all(s["config"]["conditional"] and s["num_classes"] == 10 for s in states)
    assert metrics_rows(Path(resumed.path))[1]["resumed"]["from_epoch"] == 1
    digests = [_state_digest(s["generator"], s["discriminator"], s["ema_generator"]) for s in states]
    assert digests[0] == digests[1]
    assert torch.equal(states[0]["fixed_noise"], states[1]["fixed_noise"])


def test_resume_continues_each_ranks_random_stream_and_reseeds_at_another_world_size(tmp_path, tiny_data_dir, capsys):
    checkpoint = read_checkpoint(checkpoint_folders(_train(tmp_path, tiny_data_dir, epochs=1))[0])
    config = TrainConfig.from_dict(checkpoint["config"])

    TrainingState.build(config, checkpoint["data_fingerprint"], 0, 1, torch.device("cpu")).resume(checkpoint)
    drawn = torch.rand(4)
    torch.set_rng_state(checkpoint["rng"]["states"][0]["cpu"])
    assert torch.equal(drawn, torch.rand(4))  # same world size: rank 0 goes on where it stopped

    TrainingState.build(config, checkpoint["data_fingerprint"], 1, 2, torch.device("cpu")).resume(checkpoint)
    drawn = torch.rand(4)
    torch.manual_seed(config.seed + 1 + 1_000_003 * 2)  # rank 1, epoch 2
    assert torch.equal(drawn, torch.rand(4))
    assert "checkpoint was written by 1 workers; random streams reseeded" in capsys.readouterr().out
