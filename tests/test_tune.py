"""`gan-job tune`: refusals before any Ray work, a real ASHA sweep and a real PBT sweep on the shared local Ray
cluster (its head declares the trial drivers' resource, as the manifests' heads do)."""

from __future__ import annotations

import csv
import json
import pickle
import time
from pathlib import Path

import pytest

import job.sweep.tuner
from job.cli import main
from job.runtime.driver import DriverRun, build_trainer
from job.config import TrainConfig
from job.storage.checkpoint_schema import checkpoint_digest
from job.storage.checkpoint import read_checkpoint
from job.storage.location import resolve_location
from job.sweep.spec import SweepArgs, spec_of
from job.sweep.spec import SPEC_FILE
from job.sweep.trial import TRIAL_DRIVER_RESOURCE
from tests.conftest import driver_run, metrics_rows, train_one_process

SMALL = ["--data", "fashion-mnist", "--limit", "128", "--batch-size", "32", "--eval-num", "64", "--num-workers", "1",
         "--cpus-per-worker", "1", "--final-eval-num", "64"]  # fmt: skip


def tune_argv(storage: Path, data_dir: Path, *extra: str, sweep: str = "s") -> list[str]:
    return ["tune", *SMALL, "--data-dir", str(data_dir), "--storage", str(storage), "--sweep", sweep, *extra]


def refusal(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("space", "named"),
    [
        (["lr=log:0:1e-3"], "--lr must be a finite number in (0, 1]"),
        (["beta1=log:0:0.9"], "log-uniform needs a low bound above 0"),
        (["lr=log:1e-3:1e-5"], "the low bound must be below the high one"),
        (["beta1=0,0.5,1.5"], "--beta1"),
        (["batch_size=64,0"], "--batch-size"),
        (["epochs=1,2"], "not a setting a sweep searches"),
        (["lr"], "is not NAME=SPEC"),
        (["lr=gauss:1:2"], "is not log or uniform"),
        (["lr=log:1e-5:1e-3", "lr=1e-4"], "twice"),
        (["batch_size=7,8", "--num-workers", "2"], "--batch-size"),  # 7 images do not split over 2 workers
        # Sampled, every integer in the range may come: 65 does not split over 2 workers although 64 and 128 do.
        (["batch_size=uniform:64:128", "--num-workers", "2"], "--batch-size 65 does not split evenly"),
        (
            ["seed=" + ",".join(map(str, range(101))), "lr=" + ",".join(f"{i}e-5" for i in range(1, 101))],
            "makes 10,100 trials, more than the 10,000",
        ),  # fmt: skip
    ],
)
def test_a_bad_space_is_refused_in_one_line_before_anything_is_written(space, named, tmp_path, capsys):
    flags = [word for text in space for word in (("--space", text) if "=" in text or text == "lr" else (text,))]
    status = main(tune_argv(tmp_path / "runs", tmp_path, *flags))
    err = refusal(capsys)
    assert status == 2 and "--space" in err and named in err, err
    assert not (tmp_path / "runs").exists()


def test_searched_noise_dims_are_checked_against_the_init_from_checkpoint(tmp_path, small_fashion_dir, capsys):
    donor = train_one_process(tmp_path / "runs", small_fashion_dir, "donor", limit=32)
    argv = tune_argv(tmp_path / "sweeps", small_fashion_dir, "--init-from", str(donor), "--space", "noise_dim=100,64")
    assert main(argv) == 2
    assert "cannot warm-start this configuration: --noise-dim 100 (it) vs 64 (now)" in refusal(capsys)
    assert not (tmp_path / "sweeps").exists()


def test_each_searched_dataset_is_found_before_any_trial(tmp_path, small_fashion_dir, capsys, monkeypatch):
    argv = tune_argv(tmp_path / "sweeps", small_fashion_dir, "--space", "data=fashion-mnist,mnist")
    assert main(argv) == 2  # with --data-dir, every trial would read the same files whatever its dataset
    assert "--space 'data=fashion-mnist,mnist' with --data-dir" in refusal(capsys)
    argv = [word for word in argv if word != str(small_fashion_dir)]
    argv.remove("--data-dir")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # offline: MNIST is not on this machine
    assert main(argv) == 2
    assert "could not download mnist" in refusal(capsys)
    assert not (tmp_path / "sweeps").exists()


def test_a_sweep_named_after_a_file_is_refused(tmp_path, small_fashion_dir, capsys):
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "s").write_text("a file")
    assert main(tune_argv(tmp_path / "sweeps", small_fashion_dir, "--space", "lr=1e-4")) == 2
    assert "--sweep s:" in (line := refusal(capsys)) and "is a file, not a folder" in line


def test_pbt_refuses_a_setting_an_exploit_cannot_mutate(tmp_path, capsys):
    status = main(tune_argv(tmp_path / "runs", tmp_path, "--scheduler", "pbt", "--space", "batch_size=32,64"))
    err = refusal(capsys)
    assert status == 2 and "--scheduler pbt mutates only lr and beta1" in err, err


def test_flags_a_sweep_sets_itself_are_refused(tmp_path, capsys):
    assert main(tune_argv(tmp_path / "runs", tmp_path, "--run-name", "x", "--space", "lr=1e-4")) == 2
    assert "--run-name is set by the sweep" in refusal(capsys)
    assert main(tune_argv(tmp_path / "runs", tmp_path, "--eval-every", "2", "--space", "lr=1e-4")) == 2
    assert "--eval-every is 1 in a sweep" in refusal(capsys)


def test_a_resume_with_other_flags_is_refused_naming_each(tmp_path, small_fashion_dir, capsys):
    storage = tmp_path / "runs"
    config = TrainConfig(data="fashion-mnist", data_dir=str(small_fashion_dir), storage=str(storage), limit=128,
                         batch_size=32, eval_num=64, num_workers=1, cpus_per_worker=1)  # fmt: skip
    started = SweepArgs("s", ["lr=log:1e-5:1e-3"], trials=4, final_eval_num=64)
    (storage / "s").mkdir(parents=True)
    (storage / "s" / SPEC_FILE).write_text(spec_of(started, config).to_json())
    before = (storage / "s" / SPEC_FILE).read_text()
    status = main(tune_argv(storage, small_fashion_dir, "--space", "lr=log:1e-5:1e-2", "--trials", "4", "--lr", "3e-4"))
    err = refusal(capsys)
    assert status == 2, err
    assert "--space lr=log:1e-5:1e-3 (sweep.json) vs lr=log:1e-5:1e-2 (now)" in err
    assert "--lr 0.0001 (sweep.json) vs 0.0003 (now)" in err
    assert (storage / "s" / SPEC_FILE).read_text() == before and sorted(p.name for p in (storage / "s").iterdir()) == [
        SPEC_FILE
    ]


@pytest.mark.ray
def test_a_sweep_that_can_never_be_placed_is_refused_in_one_line(ray_cluster, tmp_path, small_fashion_dir, capsys):
    argv = tune_argv(tmp_path / "runs", small_fashion_dir, "--space", "lr=1e-4,2e-4")
    argv[argv.index("--num-workers") + 1] = "4"  # the shared cluster has 2 CPUs
    status = main(argv)
    err = refusal(capsys)
    assert status == 2 and "cannot be placed" in err and "--num-workers 4" in err, err
    assert not (tmp_path / "runs" / "s" / SPEC_FILE).exists()


@pytest.mark.ray
def test_a_cluster_without_the_trial_drivers_resource_is_refused(
    ray_cluster, tmp_path, small_fashion_dir, capsys, monkeypatch
):
    # The shared cluster's head declares gan_job_trial_driver; a name it does not declare stands for a cluster
    # that lacks it (the check asks the real cluster).
    monkeypatch.setattr(job.sweep.tuner, "TRIAL_DRIVER_RESOURCE", "gan_job_trial_driver_missing")
    status = main(tune_argv(tmp_path / "runs", small_fashion_dir, "--space", "lr=1e-4,2e-4"))
    err = refusal(capsys)
    assert status == 2 and "rayStartParams.resources" in err and "gan_job_trial_driver_missing" in err, err


def results(sweep: Path) -> list[dict]:
    with open(sweep / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.ray
def test_an_asha_sweep_runs_each_trial_as_a_run_ranks_them_by_fid_and_promotes_the_winner(
    ray_cluster, tmp_path, small_fashion_dir, cached_classifier, capsys
):
    storage = tmp_path / "runs"
    latest = storage / "gan" / "LATEST"
    argv = tune_argv(storage, small_fashion_dir, "--epochs", "2", "--scheduler", "asha", "--space",
                     "lr=1e-5,5e-4", "--promote-to", str(latest))  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    sweep = storage / "s"
    rows = results(sweep)
    assert sorted(float(r["lr"]) for r in rows) == [1e-5, 5e-4]
    for row in rows:  # each trial an ordinary run: every epoch once, scored
        assert row["status"] == "finished" or row["status"] == "stopped by asha at epoch 1", row
        # A stopped trial's run may finish the epoch it was in: results.csv counts what the run recorded.
        epochs = [r["epoch"] for r in metrics_rows(sweep / "runs" / row["run"])]
        assert epochs == list(range(1, int(row["epochs"]) + 1)) and all(
            "quality" in r for r in metrics_rows(sweep / "runs" / row["run"])
        )
    finished = [r for r in rows if r["status"] == "finished"]
    winner = min(finished, key=lambda r: float(r["fid_final"]))
    evaluation = json.loads((sweep / "runs" / winner["run"] / "artifacts" / "eval.json").read_text())
    assert evaluation["num_images"] == 64 and evaluation["seed"] == 0 and evaluation["epoch"] == 2
    assert float(winner["fid_final"]) == pytest.approx(evaluation["fid_classifier"], rel=1e-3)
    assert (sweep / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((sweep / SPEC_FILE).read_text())["space"] == ["lr=1e-5,5e-4"]
    pointer = json.loads(latest.read_text())
    assert pointer["run"] == str(sweep / "runs" / winner["run"]) and pointer["decision"]["sweep"] == "s"
    assert f"best: trial {winner['trial']}" in out


@pytest.mark.ray
def test_pbt_exploits_for_real_the_exploited_trial_continues_from_the_donors_weights(
    ray_cluster, tmp_path, small_fashion_dir, cached_classifier, capsys
):
    storage = tmp_path / "runs"
    # Two trials, one far worse (lr 1e-6 barely moves): at each segment's end the worse one takes the other's.
    argv = tune_argv(storage, small_fashion_dir, "--epochs", "2", "--scheduler", "pbt", "--perturbation-interval",
                     "1", "--space", "lr=1e-6,1e-3")  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    sweep = storage / "s"
    exploits = [line for line in out.splitlines() if line.startswith("exploit: ")]
    assert exploits, out[-3000:]
    runs = sorted(p.name for p in (sweep / "runs").iterdir())
    continued = [name for name in runs if "." in name]
    assert continued, runs
    for name in continued:
        first = metrics_rows(sweep / "runs" / name)[0]
        donor_state = Path(first["init_from"]["uri"])
        segment = json.loads((donor_state / "segment.json").read_text())
        trial, epoch = name.rsplit(".", 1)
        assert segment["trial"] != trial and segment["trial_epoch"] == int(epoch)
        # The digest of its first state, after loading, is the donor's: the weights really came across.
        assert first["init_from"]["parameter_digest"] == checkpoint_digest(
            read_checkpoint(resolve_location(str(donor_state)))
        )
        assert f"trial {trial} took trial {segment['trial']}'s weights at epoch {epoch}" in out
    rows = results(sweep)
    assert {r["status"] for r in rows} == {"finished"} and {r["epochs"] for r in rows} == {"2"}


@pytest.mark.ray
def test_a_stopped_trials_worker_group_is_released_while_another_ray_cluster_runs_on_the_machine(
    ray_cluster, ray_head, tmp_path, small_fashion_dir
):
    # Tune stops a trial by killing its driver: the run's Train controller dies with it, ungracefully, and only
    # Ray Train's PlacementGroupCleaner gives the worker group's CPUs back. It asks the State API whether the
    # controller lives, at the address its processes were given (with a second cluster up, a guess fails).
    config = TrainConfig(data="fashion-mnist", data_dir=str(small_fashion_dir), limit=128, batch_size=32, epochs=200,
                         num_workers=1, cpus_per_worker=1, eval_every=0, storage=str(tmp_path / "runs"),
                         run_name="stopped")  # fmt: skip
    (tmp_path / "runs").mkdir()

    def trial_driver(trial: DriverRun) -> None:
        build_trainer(trial).fit()

    ray = ray_cluster
    driver = ray.remote(num_cpus=0, resources={TRIAL_DRIVER_RESOURCE: 1})(trial_driver).remote(driver_run(config))
    metrics = tmp_path / "runs" / "stopped" / "artifacts" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metrics.exists() and ray.available_resources().get("CPU", 0) < 2  # training, on one of the two CPUs
    ray.cancel(driver, force=True)
    deadline = time.monotonic() + 90
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2


class Planted:
    """A pickle that, when loaded, creates the file `marker`: what someone who can write the sweep's storage plants."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.ray
def test_a_sweep_resumes_only_from_state_it_signed_and_a_planted_pickle_never_runs(
    ray_cluster, tmp_path, small_fashion_dir, cached_classifier, capsys
):
    storage, marker = tmp_path / "runs", tmp_path / "marker"
    argv = tune_argv(storage, small_fashion_dir, "--epochs", "1", "--scheduler", "fifo", "--space", "lr=1e-4")
    assert main(argv) == 0
    tune = storage / "s" / "tune"
    assert (tune / "tuner.pkl").read_bytes().startswith(b"gan-job signed v1")  # sealed, not a bare pickle
    assert main(argv) == 0 and "resuming sweep s" in capsys.readouterr().out  # Tuner.restore reads its own state
    genuine = (tune / "tuner.pkl").read_bytes()
    # Tune's trial state: JSON whose objects may embed cloudpickle, which Tune expands when it resumes.
    payload = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(Planted(marker)).hex()}
    state = json.dumps({"runner_data": payload, "trial_data": []}).encode()
    newest = "experiment_state-2999-01-01_00-00-00.json"  # sorts after Tune's own: the one a resume would load
    for name, planted in (("tuner.pkl", pickle.dumps(Planted(marker))), (newest, state)):
        (tune / name).write_bytes(planted)
        before = tree(storage)
        assert main(argv) == 2
        err = refusal(capsys)
        assert f"{tune / name} is not signed by gan-job" in err and "not resumed" in err, err
        assert not marker.exists() and tree(storage) == before
        (tune / name).unlink()
    (tune / "tuner.pkl").write_bytes(genuine[:-1] + bytes([genuine[-1] ^ 1]))  # one bit of the sealed state altered
    assert main(argv) == 2 and "does not match its signature" in refusal(capsys)
