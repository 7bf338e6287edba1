"""`promote`: LATEST moves to a finished run that is no worse, atomically, and every decision is logged."""

import json
import os
import shutil

import pytest

from job.cli import main
from job.storage.checkpoint import checkpoint_folders
from job.storage.location import resolve_location
from job.storage.pointer import resolve_latest
from tests.conftest import train_one_process


NUM = "64"  # generated images per evaluation: enough for the numbers, quick on a CPU


@pytest.fixture(scope="session")
def template_run(small_fashion_dir, tmp_path_factory):
    """One finished one-epoch run, trained once; tests copy it under the names they need."""
    return resolve_location(
        str(train_one_process(tmp_path_factory.mktemp("template") / "runs", small_fashion_dir, "r1", limit=64))
    )


@pytest.fixture
def storage(tmp_path, template_run, cached_classifier):
    """A storage folder with finished runs `a` and `b` (copies of one run) and a job folder for LATEST."""
    for name in ("a", "b"):
        shutil.copytree(template_run.path, tmp_path / "runs" / name)
    (tmp_path / "runs" / "job").mkdir()
    return tmp_path / "runs"


def promote_main(*argv):
    """`gan-job promote ARGV` through the CLI, as a user runs it."""
    return main(["promote", *map(str, argv)])


def promote_run(storage, name, data_dir, capsys, *extra):
    """Promote `<storage>/<name>` to `<storage>/job/LATEST`; the printed decision."""
    capsys.readouterr()
    status = promote_main(
        "--run", storage / name, "--target", storage / "job" / "LATEST", "--data-dir", data_dir, "--num", NUM, *extra
    )
    assert status == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def set_stored_fid(storage, name, fid):
    """Give run `name` an eval.json like run `a`'s (same protocol) with another fid_classifier."""
    stored = json.loads((storage / "a" / "artifacts" / "eval.json").read_text())
    stored.update(source=checkpoint_folders(_location(storage / name))[0].uri, fid_classifier=fid)
    (storage / name / "artifacts" / "eval.json").write_text(json.dumps(stored))


def _location(path):
    return resolve_location(str(path))


def latest(storage):
    return json.loads((storage / "job" / "LATEST").read_text())


def test_a_finished_run_is_evaluated_and_promoted_when_there_is_no_latest(storage, small_fashion_dir, capsys):
    decision = promote_run(storage, "a", small_fashion_dir, capsys)
    assert decision["promoted"] is True
    stored = json.loads((storage / "a" / "artifacts" / "eval.json").read_text())
    assert stored["num_images"] == int(NUM) and stored["fid_classifier"] == decision["fid_classifier"]
    pointer = latest(storage)
    assert (
        pointer["run"] == str(storage / "a")
        and pointer["fid_classifier"] == stored["fid_classifier"]
        and pointer["promoted_at"]
    )
    assert [json.loads(line) for line in (storage / "job" / "promotions.jsonl").read_text().splitlines()] == [decision]
    assert (
        pointer["decision"] == decision
    )  # LATEST carries the decision that made it (until it is logged: job/storage/pointer.py)


def test_a_better_run_replaces_latest(storage, small_fashion_dir, capsys):
    first = promote_run(storage, "a", small_fashion_dir, capsys)
    set_stored_fid(storage, "b", first["fid_classifier"] * 0.9)
    decision = promote_run(storage, "b", small_fashion_dir, capsys)
    assert decision["promoted"] is True and decision["current_fid_classifier"] == first["fid_classifier"]
    assert latest(storage)["run"] == str(storage / "b")


def test_a_worse_run_is_not_promoted_and_latest_is_left_alone(storage, small_fashion_dir, capsys):
    first = promote_run(storage, "a", small_fashion_dir, capsys)
    before = (storage / "job" / "LATEST").read_bytes()
    set_stored_fid(storage, "b", first["fid_classifier"] * 1.1)
    decision = promote_run(storage, "b", small_fashion_dir, capsys)
    assert decision["promoted"] is False
    assert decision["fid_classifier"] > decision["current_fid_classifier"] == first["fid_classifier"]
    assert (storage / "job" / "LATEST").read_bytes() == before
    assert len((storage / "job" / "promotions.jsonl").read_text().splitlines()) == 2


def test_the_margin_lets_a_slightly_worse_run_through(storage, small_fashion_dir, capsys):
    first = promote_run(storage, "a", small_fashion_dir, capsys)
    set_stored_fid(storage, "b", first["fid_classifier"] * 1.04)
    assert promote_run(storage, "b", small_fashion_dir, capsys)["promoted"] is False
    assert promote_run(storage, "b", small_fashion_dir, capsys, "--margin", "0.05")["promoted"] is True


def test_an_unfinished_run_is_not_promoted(storage, small_fashion_dir, capsys):
    (storage / "a" / "artifacts" / "model.json").unlink()
    decision = promote_run(storage, "a", small_fashion_dir, capsys)
    assert decision["promoted"] is False and "not finished" in decision["reason"]
    assert not (storage / "job" / "LATEST").exists()


def test_latest_measured_another_way_is_evaluated_again_before_comparing(storage, small_fashion_dir, capsys):
    first = promote_run(storage, "a", small_fashion_dir, capsys)
    pointer = latest(storage)
    pointer["evaluation"]["reference"]["classifier"]["digest"] = "another-classifier"
    pointer["fid_classifier"] = 0.0  # a number from another classifier must not decide
    (storage / "job" / "LATEST").write_text(json.dumps(pointer))
    set_stored_fid(storage, "b", first["fid_classifier"])
    decision = promote_run(storage, "b", small_fashion_dir, capsys)
    assert decision["current_reevaluated"] is True and decision["current_fid_classifier"] == first["fid_classifier"]
    assert decision["promoted"] is True


def test_a_failing_write_leaves_the_old_latest_whole_and_readable(storage, small_fashion_dir, capsys, monkeypatch):
    first = promote_run(storage, "a", small_fashion_dir, capsys)
    before = (storage / "job" / "LATEST").read_bytes()
    set_stored_fid(storage, "b", first["fid_classifier"] * 0.5)
    real_fdopen = os.fdopen

    class HalfWrite:
        """A handle whose write stops halfway with a full disk."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(
        os,
        "fdopen",
        lambda fd, mode="r", *a, **k: (
            HalfWrite(real_fdopen(fd, mode, *a, **k)) if "w" in mode else real_fdopen(fd, mode, *a, **k)
        ),
    )
    capsys.readouterr()
    assert (
        promote_main(
            "--run",
            storage / "b",
            "--target",
            storage / "job" / "LATEST",
            "--data-dir",
            small_fashion_dir,
            "--num",
            NUM,
        )
        == 1
    )
    monkeypatch.undo()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "LATEST" in lines[0], (
        lines
    )  # at once, no retries
    assert (storage / "job" / "LATEST").read_bytes() == before
    assert resolve_latest(str(storage / "job" / "LATEST")) == str(storage / "a")
    assert not [p for p in (storage / "job").iterdir() if p.name.startswith(".tmp-")]


def test_resolve_latest_follows_the_pointer_and_leaves_folders_as_they_are(storage, small_fashion_dir, capsys):
    promote_run(storage, "a", small_fashion_dir, capsys)
    assert resolve_latest(str(storage / "job" / "LATEST")) == str(storage / "a")
    assert resolve_latest(str(storage / "b")) == str(storage / "b")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--run", "{s}/missing", "--target", "{s}/job/LATEST"], "--run"),
        (["--run", "{s}/a", "--target", "{s}/job"], "--target"),
        (["--run", "{s}/a", "--target", "{s}/job/LATEST", "--margin", "nan"], "--margin"),
        (["--run", "{s}/a", "--target", "{s}/job/LATEST", "--num", "0"], "--num"),
        (["--run", "{s}/a", "--target", "{s}/job/LATEST", "--num", str(10**9)], "--num"),
        (
            ["--run", "{s}/a", "--target", "{s}/job/LATEST", "--seed", str(2**64)],
            "--seed",
        ),  # torch.manual_seed would raise
        (["--run", "{s}/a", "--target", "{s}/job/LATEST", "--margin", "1e9"], "--margin"),
        (["--run", "{s}/a", "--target", "{s}/a/artifacts/model.json"], "--target"),  # not a pointer
    ],
)
def test_bad_input_is_refused_naming_the_flag_and_writes_nothing(storage, argv, flag, capsys):
    assert promote_main(*[a.format(s=storage) for a in argv]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("gan-job") and flag in line and "Traceback" not in captured.err
    assert (
        not (storage / "job" / "promotions.jsonl").exists() and not (storage / "a" / "artifacts" / "eval.json").exists()
    )


@pytest.mark.s3
def test_promotion_into_a_bucket_writes_the_pointer_object_that_resolve_latest_follows(
    storage, small_fashion_dir, s3_server, capsys
):
    client = s3_server.client()
    for path in (storage / "a").rglob("*"):
        if path.is_file():
            client.put_object(
                Bucket=s3_server.bucket, Key=f"promote/runs/a/{path.relative_to(storage / 'a')}", Body=path.read_bytes()
            )
    run, target = f"s3://{s3_server.bucket}/promote/runs/a", f"s3://{s3_server.bucket}/promote/job/LATEST"
    capsys.readouterr()
    assert (
        promote_main(
            "--run",
            run,
            "--target",
            target,
            "--data-dir",
            small_fashion_dir,
            "--num",
            NUM,
            "--s3-endpoint",
            s3_server.url,
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["promoted"] is True
    objects = s3_server.objects()
    assert json.loads(objects["promote/job/LATEST"])["run"] == run
    assert "promote/job/promotions.jsonl" in objects and "promote/runs/a/artifacts/eval.json" in objects
    assert resolve_latest(target, s3_server.url) == run


# `train --promote-to`: the driver promotes its finished run in-process, as `promote` would.


@pytest.fixture
def ray_train_replaced(monkeypatch):
    """`train`'s driver with Ray Train replaced (no cluster): `fit` runs `state.on_fit` and returns
    `state.metrics`. The runs it "trains" are the storage fixture's, which are already finished."""
    from types import SimpleNamespace

    import job.runtime.driver

    state = SimpleNamespace(on_fit=lambda: None, metrics={})

    class Trainer:
        def fit(self):
            state.on_fit()
            return SimpleNamespace(metrics=state.metrics)

    monkeypatch.setattr(job.runtime.driver, "connect_ray", lambda resources=None: None)
    monkeypatch.setattr(job.runtime.driver, "place", lambda config: config)
    monkeypatch.setattr(job.runtime.driver, "build_trainer", lambda run, callbacks=None: Trainer())
    monkeypatch.setattr("job.promotion.gate.DEFAULT_NUM", int(NUM))  # promote's default image count, small here
    return state


def train_main(storage, name, data_dir, *extra):
    """`gan-job train` of run `name` (the template run's configuration, so it "resumes") with `extra` flags."""
    argv = ["train", "--data", "fashion-mnist", "--data-dir", data_dir, "--epochs", "1", "--batch-size", "32",
            "--limit", "64", "--cpus-per-worker", "1", "--eval-every", "0",
            "--storage", storage, "--run-name", name, *extra]  # fmt: skip
    return main([str(a) for a in argv])


def printed_decisions(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.usefixtures("ray_train_replaced")
def test_train_promote_to_promotes_the_finished_run_with_promotes_defaults(storage, small_fashion_dir, capsys):
    target = storage / "job" / "LATEST"
    assert train_main(storage, "a", small_fashion_dir, "--promote-to", target) == 0
    (decision,) = printed_decisions(capsys.readouterr().out)
    assert decision["promoted"] is True and decision["margin"] == 0.0 and decision["run"] == str(storage / "a")
    pointer = latest(storage)
    assert (
        pointer["run"] == str(storage / "a")
        and pointer["evaluation"]["num_images"] == int(NUM)
        and pointer["evaluation"]["seed"] == 0
    )
    assert pointer["evaluation"]["data"] == "fashion-mnist", "the run's data"
    assert [json.loads(line) for line in (storage / "job" / "promotions.jsonl").read_text().splitlines()] == [decision]


@pytest.mark.usefixtures("ray_train_replaced")
def test_train_exits_0_when_the_promotion_is_declined_and_the_margin_is_promotes(storage, small_fashion_dir, capsys):
    target = storage / "job" / "LATEST"
    first = promote_run(storage, "a", small_fashion_dir, capsys)
    before = target.read_bytes()
    set_stored_fid(storage, "b", first["fid_classifier"] * 1.04)
    assert train_main(storage, "b", small_fashion_dir, "--promote-to", target) == 0
    (declined,) = printed_decisions(capsys.readouterr().out)
    assert declined["promoted"] is False and target.read_bytes() == before
    assert train_main(storage, "b", small_fashion_dir, "--promote-to", target, "--promote-margin", "0.05") == 0
    (promoted,) = printed_decisions(capsys.readouterr().out)
    assert promoted["promoted"] is True and promoted["margin"] == 0.05 and latest(storage)["run"] == str(storage / "b")
    assert len((storage / "job" / "promotions.jsonl").read_text().splitlines()) == 3, "every decision logged"


def test_train_exits_3_when_training_finished_but_the_promotion_failed(
    storage, small_fashion_dir, ray_train_replaced, capsys
):
    from job.promotion.gate import PROMOTION_FAILED

    target = storage / "job" / "LATEST"
    ray_train_replaced.on_fit = lambda: target.write_text(
        "damaged while the run trained"
    )  # checked before training, broken after
    assert train_main(storage, "a", small_fashion_dir, "--promote-to", target) == PROMOTION_FAILED == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and not printed_decisions(captured.out)
    (line,) = [line for line in captured.err.splitlines() if line.startswith("gan-job")]
    assert (
        "run a finished, but promoting it" in line
        and "exit status 3" in line
        and f"gan-job promote --run {storage / 'a'}" in line
    )
    assert target.read_text() == "damaged while the run trained" and not (storage / "job" / "promotions.jsonl").exists()


def test_train_exits_3_on_an_unexpected_promotion_failure_too(
    storage, small_fashion_dir, ray_train_replaced, monkeypatch, capsys
):
    import job.promotion.gate

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(job.promotion.gate, "promote_run", broken)
    assert train_main(storage, "a", small_fashion_dir, "--promote-to", storage / "job" / "LATEST") == 3
    err = capsys.readouterr().err
    assert "RuntimeError: a bug" in err.splitlines()[-1] and "Traceback" in err  # a bug keeps its trace


def test_a_failed_training_is_not_promoted(storage, small_fashion_dir, ray_train_replaced, capsys):
    ray_train_replaced.metrics = {"stopped": "divergence"}  # a guard with --on-divergence stop ended the run
    assert train_main(storage, "a", small_fashion_dir, "--promote-to", storage / "job" / "LATEST") == 1
    assert not (storage / "job" / "LATEST").exists() and not (storage / "job" / "promotions.jsonl").exists()
    assert not printed_decisions(capsys.readouterr().out)


@pytest.mark.usefixtures("ray_train_replaced")
def test_train_never_promotes_because_of_the_environment(storage, small_fashion_dir, monkeypatch, capsys):
    monkeypatch.setenv("GAN_JOB_PROMOTE_TO", str(storage / "job" / "LATEST"))
    assert train_main(storage, "a", small_fashion_dir) == 0
    assert not (storage / "job" / "LATEST").exists() and not printed_decisions(capsys.readouterr().out)
