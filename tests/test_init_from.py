"""`train --init-from`: a warm start into a new run (weights, both optimizers' state, the EMA), distinct
from resuming a run by its name; and a resume that changes --lr or --beta1 applies them and says so."""

from __future__ import annotations

import json

import pytest
import torch

import job.runtime.driver
from job.cli import main
from job.runtime.driver import decide_start
from job.config import TrainConfig
from job.storage.checkpoint import checkpoint_folders, read_checkpoint
from job.storage.location import resolve_location
from tests.conftest import metrics_rows, train_one_process

STABLE = {"recipe": "stable", "limit": 64}  # with train_one_process's batch of 32: two steps an epoch; an EMA


def newest(run) -> dict:
    return read_checkpoint(checkpoint_folders(resolve_location(str(run)))[0])


@pytest.fixture
def donor(tmp_path, small_fashion_dir):
    """A finished run of two epochs (four steps), its EMA on."""
    return train_one_process(tmp_path / "runs", small_fashion_dir, "donor", epochs=2, **STABLE)


def test_a_warm_start_takes_the_donors_weights_optimizer_state_and_ema_and_starts_at_epoch_1(
    donor, tmp_path, small_fashion_dir
):
    source = checkpoint_folders(resolve_location(str(donor)))[0].uri
    run = train_one_process(tmp_path / "runs", small_fashion_dir, "warm", init_from=source, lr=5e-4, beta1=0.3,
                            seed=7, **STABLE)  # fmt: skip
    donor_model = json.loads((donor / "artifacts" / "model.json").read_text())
    rows = metrics_rows(run)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2)]  # its own position, from epoch 1
    assert rows[0]["init_from"] == {"uri": source, "epoch": 2, "parameter_digest": donor_model["param_digests"][0]}
    state, donor_state = newest(run), newest(donor)
    for optimizer in ("optimizer_g", "optimizer_d"):
        group = state[optimizer]["param_groups"][0]
        assert group["lr"] == 5e-4 and group["betas"][0] == 0.3  # this run's hyperparameters, written in
        steps = {int(s["step"]) for s in state[optimizer]["state"].values()}
        assert steps == {6}  # Adam's moments went on from the donor's 4 steps
    assert state["ema_updates"] == donor_state["ema_updates"] + 2
    assert not torch.equal(state["fixed_noise"], donor_state["fixed_noise"])  # its own grid noise (seed 7)


def test_a_warm_started_run_later_resumes_itself_not_the_donor(donor, tmp_path, small_fashion_dir, capsys):
    source = checkpoint_folders(resolve_location(str(donor)))[0].uri
    train_one_process(tmp_path / "runs", small_fashion_dir, "warm", init_from=source, **STABLE)
    capsys.readouterr()
    run = train_one_process(tmp_path / "runs", small_fashion_dir, "warm", init_from=source, epochs=2, **STABLE)
    out = capsys.readouterr().out
    assert "resuming run warm at epoch 2 (step 2)" in out and "warm start" not in out
    rows = metrics_rows(run)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2), (2, 4)]
    assert "init_from" in rows[0] and "init_from" not in rows[1]


def test_a_resume_with_another_lr_applies_it_and_says_so(donor, tmp_path, small_fashion_dir, capsys):
    capsys.readouterr()
    train_one_process(tmp_path / "runs", small_fashion_dir, "donor", epochs=3, lr=3e-4, **STABLE)
    assert "note: run donor goes on with --lr 0.0003 --beta1 0.5 (its checkpoint had lr 0.0002, beta1 0.5)" in (
        capsys.readouterr().out
    )
    assert {g["lr"] for g in newest(donor)["optimizer_g"]["param_groups"]} == {3e-4}


def _config(tmp_path, small_fashion_dir, init_from: str, run_name: str = "new") -> TrainConfig:
    return TrainConfig(data="fashion-mnist", data_dir=str(small_fashion_dir), storage=str(tmp_path / "runs"),
                       run_name=run_name, init_from=init_from, **STABLE)  # fmt: skip


def test_the_driver_resolves_a_latest_pointer_to_its_runs_newest_checkpoint(donor, tmp_path, small_fashion_dir):
    latest = tmp_path / "job" / "LATEST"
    latest.parent.mkdir()
    latest.write_text(json.dumps({"run": str(donor)}))
    config = _config(tmp_path, small_fashion_dir, str(latest))
    start, resolved = decide_start(config, resolve_location(config.storage).child("new"))
    assert start == "warm" and resolved.init_from == checkpoint_folders(resolve_location(str(donor)))[0].uri


def test_a_run_with_checkpoints_of_its_own_ignores_init_from_and_says_so(donor, tmp_path, small_fashion_dir, capsys):
    config = _config(tmp_path, small_fashion_dir, str(donor), run_name="donor")
    start, resolved = decide_start(config, resolve_location(config.storage).child("donor"))
    assert start == "resume" and resolved.init_from is None
    assert "has checkpoints of its own and resumes from them; --init-from is not used" in capsys.readouterr().out


@pytest.fixture
def no_ray(monkeypatch):
    def refuse() -> None:
        raise AssertionError("bad input reached Ray: job.runtime.driver.connect_ray() was called")

    monkeypatch.setattr(job.runtime.driver, "connect_ray", refuse)


@pytest.mark.parametrize(
    "extra, source, expected",
    [
        (["--noise-dim", "64"], "donor", "--init-from {src} cannot warm-start this configuration: --noise-dim 100"),
        (["--recipe", "conditional"], "donor", "--init-from {src} cannot warm-start this configuration: --conditional"),
        ([], "nothing-there", "--init-from {src} holds no checkpoint"),
    ],
    ids=["other noise dim", "conditional", "nothing there"],
)
def test_a_source_that_cannot_warm_start_the_run_is_refused_in_one_line(
    donor, tmp_path, small_fashion_dir, capsys, no_ray, extra, source, expected
):
    path = str(tmp_path / "runs" / source)
    argv = ["train", "--data", "fashion-mnist", "--data-dir", str(small_fashion_dir), "--storage",
            str(tmp_path / "new-runs"), "--run-name", "new", "--init-from", path, *extra]  # fmt: skip
    if source == "donor":
        path = checkpoint_folders(resolve_location(path))[0].uri
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected.format(src=path) in lines[0], lines
    assert not (tmp_path / "new-runs").exists()  # nothing written
