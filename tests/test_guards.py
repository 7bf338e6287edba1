"""The divergence and collapse guards, alone and in the training loop."""

import math

import pytest

import gan.step
import job.runtime.quality
from job.runtime.guards import MAX_ROLLBACKS, CollapseGuard, DivergenceGuard, Guards
from tests.conftest import metrics_rows, train_one_process

HEALTHY = {"epoch": 1, "loss_d": 1.2, "loss_g": 0.9, "d_real_prob": 0.6, "d_fake_prob": 0.4}


def test_non_finite_loss_is_divergence_at_once():
    verdict = DivergenceGuard("rollback").check({**HEALTHY, "loss_d": math.nan})
    assert verdict and verdict.guard == "divergence" and verdict.action == "rollback" and "non-finite" in verdict.cause


def test_saturated_discriminator_counts_only_when_it_lasts():
    guard = DivergenceGuard("stop", patience=2)
    saturated = {**HEALTHY, "d_real_prob": 0.999, "d_fake_prob": 0.0005}
    assert guard.check(saturated) is None
    assert guard.check(HEALTHY) is None  # a healthy epoch resets the count
    assert guard.check(saturated) is None
    verdict = guard.check(saturated)
    assert verdict and "saturated" in verdict.cause and verdict.action == "stop"


def test_healthy_epochs_never_trip_the_divergence_guard():
    guard = DivergenceGuard("rollback")
    assert all(guard.check({**HEALTHY, "epoch": e}) is None for e in range(1, 50))


def test_coverage_drop_far_below_the_recent_best_trips_the_collapse_guard_after_patience():
    guard = CollapseGuard("warn", ratio=0.5, patience=2)
    for epoch, modes in enumerate([4, 6, 8, 8], start=1):
        assert guard.check(epoch, modes) is None
    assert guard.check(5, 2) is None  # one low evaluation is not yet a collapse
    verdict = guard.check(6, 1)
    assert verdict and verdict.guard == "collapse" and verdict.action == "warn"


def test_slowly_rising_or_noisy_coverage_is_not_collapse():
    guard = CollapseGuard("warn")
    for epoch, modes in enumerate([3, 4, 5, 4, 5, 6, 5, 7, 6, 7], start=1):
        assert guard.check(epoch, modes) is None


def test_guards_roll_back_at_most_max_rollbacks_times_then_stop_and_note_each_rollback_in_the_next_row():
    guards = Guards(on_divergence="rollback", on_collapse="warn")
    nan_stats = {"loss_d": math.nan, "loss_g": 0.9, "d_real_prob": 0.6, "d_fake_prob": 0.4}
    for rollback in range(1, MAX_ROLLBACKS + 1):
        row = {"epoch": 2}
        assert guards.judge(row, nan_stats).action == "rollback" and guards.rollbacks == rollback
        assert row["guard"]["action"] == "rollback" and not guards.trusted
        guards.rolled_back(to_epoch=1)
        healthy_row = {**HEALTHY, "epoch": 2}
        assert guards.judge(healthy_row, {}) is None and guards.trusted
        assert healthy_row["after_rollback"] == {
            "cause": row["guard"]["cause"],
            "diverged_at_epoch": 2,
            "resumed_from_epoch": 1,
        }
    row = {"epoch": 3}
    verdict = guards.judge(row, nan_stats)
    assert verdict.action == "stop" and verdict.cause.endswith(f"after {MAX_ROLLBACKS} rollbacks")
    assert row["guard"]["action"] == "stop" and row["stopped"] == verdict.cause


def _run(tmp_path, data_dir, **overrides):
    """The metrics rows of a 3-epoch run (3 steps an epoch on the tiny data) in this process."""
    return metrics_rows(train_one_process(tmp_path / "runs", data_dir, "guarded", **{"epochs": 3, **overrides}))


@pytest.fixture
def nan_at_epoch_2(monkeypatch):
    """Plant a failure: the generator loss of every step in epoch 2 (steps 4-6) is NaN."""
    real_loss = gan.step.generator_loss
    calls = {"n": 0}

    def planted(fake_logits):
        calls["n"] += 1
        loss = real_loss(fake_logits)
        return loss * math.nan if 4 <= calls["n"] <= 6 else loss

    monkeypatch.setattr(gan.step, "generator_loss", planted)


def test_rollback_on_a_nan_loss_restores_the_last_checkpoint_and_records_the_cause(
    tmp_path, tiny_data_dir, nan_at_epoch_2
):
    rows = _run(tmp_path, tiny_data_dir, on_divergence="rollback")
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # each epoch once, epoch 2 trained again
    assert rows[1]["after_rollback"]["diverged_at_epoch"] == 2 and "non-finite" in rows[1]["after_rollback"]["cause"]
    assert all(math.isfinite(r["loss_g"]) for r in rows)
    assert rows[-1]["step"] == 9  # 3 steps an epoch; the rolled-back steps are not counted twice


def test_stop_on_a_nan_loss_ends_the_run_with_the_cause(tmp_path, tiny_data_dir, nan_at_epoch_2):
    rows = _run(tmp_path, tiny_data_dir, on_divergence="stop")
    assert rows[-1]["epoch"] == 2 and "non-finite" in rows[-1]["stopped"]
    assert not (tmp_path / "runs" / "guarded" / "artifacts" / "generator.pt").exists()  # not a finished model


def test_warn_on_a_nan_loss_records_it_and_goes_on(tmp_path, tiny_data_dir, nan_at_epoch_2):
    rows = _run(tmp_path, tiny_data_dir, on_divergence="warn")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["guard"]["action"] == "warn" and "stopped" not in rows[-1]


def test_a_healthy_run_trips_no_guard(tmp_path, tiny_data_dir):
    rows = _run(tmp_path, tiny_data_dir)
    assert not any("guard" in r or "after_rollback" in r for r in rows)


@pytest.fixture
def coverage_collapses_after_epoch_2(monkeypatch):
    """Plant a collapse: the probe scores 9, 9 classes, then 2, 1, 1 (as a generator stuck on one class scores)."""
    modes = iter([9, 9, 2, 1, 1, 1, 1, 1])

    def planted(self, generator):
        covered = next(modes)
        return {"modes_covered": covered, "fid_classifier": 10.0 * (10 - covered), "fid_classifier_floor": 1.0}

    monkeypatch.setattr(job.runtime.quality.QualityProbe, "evaluate", planted)


def test_collapse_with_stop_ends_the_run_after_patience(tmp_path, tiny_data_dir, coverage_collapses_after_epoch_2):
    rows = _run(tmp_path, tiny_data_dir, epochs=6, eval_every=1, on_collapse="stop")
    assert rows[-1]["epoch"] == 4 and "coverage" in rows[-1]["stopped"]
    assert rows[-1]["guard"]["guard"] == "collapse"


def test_collapse_with_warn_is_recorded_and_training_goes_on(tmp_path, tiny_data_dir, coverage_collapses_after_epoch_2):
    rows = _run(tmp_path, tiny_data_dir, epochs=5, eval_every=1)  # warn is the default
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    cause = (
        "class coverage 1 at epoch 4 is below 0.5 x the recent best 9 for 2 evaluations"  # from the planted 9, 9, 2, 1
    )
    assert rows[3]["guard"] == {"guard": "collapse", "cause": cause, "action": "warn"}
    assert not any("guard" in r for r in rows[:3] + rows[4:])


def test_collapse_with_rollback_returns_to_the_last_checkpoint(
    tmp_path, tiny_data_dir, coverage_collapses_after_epoch_2
):
    rows = _run(tmp_path, tiny_data_dir, epochs=5, eval_every=1, on_collapse="rollback")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["after_rollback"]["diverged_at_epoch"] == 4 and rows[2]["after_rollback"]["resumed_from_epoch"] == 2
