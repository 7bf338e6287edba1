"""Storage holds what anyone with write access put there: contents that are not what this project writes (a
sweep.json, a checkpoint, a LATEST pointer) are refused in one line naming the file, exit 2, nothing written; and
a path of the wrong kind (a file for a folder, a folder for a file) is refused at once, never retried or taken
for absent."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest

import job.runtime.driver
from job.cli import main
from job.errors import StorageRefused
from job.storage.checkpoint import STATE_FILE, checkpoint_folders, read_checkpoint, write_checkpoint
from job.storage.location import resolve_location
from job.storage.retry import ABSENT, REFUSED, classify
from tests.conftest import train_one_process

TINY = {"limit": 32}


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*_args, **_kwargs) -> None:
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr(job.runtime.driver, "connect_ray", refuse)


@pytest.fixture
def donor(tmp_path, small_fashion_dir) -> Path:
    return train_one_process(tmp_path / "runs", small_fashion_dir, "donor", **TINY)


def rewrite_newest(run: Path, change) -> str:
    """The run's newest checkpoint rewritten by `change(state)`, with a digest that matches: what a hand that can
    write the bucket, but is not gan-job, leaves."""
    folder = checkpoint_folders(resolve_location(str(run)))[0]
    state = read_checkpoint(folder)
    change(state)
    write_checkpoint(Path(folder.path), state)
    return folder.uri


def train_argv(tmp_path, small_fashion_dir, *extra: str) -> list[str]:
    return ["train", "--data", "fashion-mnist", "--data-dir", str(small_fashion_dir), "--storage",
            str(tmp_path / "new-runs"), "--run-name", "new", "--limit", "32", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.update(config=list(s["config"].items())), "config of the wrong kind"),
        (lambda s: s["config"].update(noise_dim=64), "does not hold what its config says: generator project.0.weight"),
        (lambda s: s.update(epoch="2"), "epoch of the wrong kind"),
    ],
    ids=["config a list", "config disagrees with the weights", "epoch a string"],
)
def test_a_checkpoint_that_is_not_what_gan_job_writes_is_refused_as_init_from_in_one_line(
    donor, tmp_path, small_fashion_dir, capsys, no_ray, change, expected
):
    source = rewrite_newest(donor, change)
    capsys.readouterr()
    assert main(train_argv(tmp_path, small_fashion_dir, "--init-from", source)) == 2
    line = one_line(capsys)  # no warning line beside the refusal
    assert source in line and expected in line, line
    assert not (tmp_path / "new-runs").exists()


def test_evaluate_refuses_a_checkpoint_whose_config_is_a_list_naming_it(donor, capsys):
    source = rewrite_newest(donor, lambda s: s.update(config=[1, 2]))
    capsys.readouterr()
    assert main(["evaluate", "--from", source]) == 2
    assert f"checkpoint {source} is not a gan-job checkpoint" in one_line(capsys)


def test_an_empty_init_from_is_refused_rather_than_training_from_noise(tmp_path, small_fashion_dir, capsys, no_ray):
    assert main(train_argv(tmp_path, small_fashion_dir, "--init-from", "")) == 2
    assert "--init-from is empty" in one_line(capsys)


@pytest.mark.parametrize(
    ("pointer", "expected"),
    [
        ("{tmp}/job/OTHER/LATEST", "which is a file, not a run folder"),  # a LATEST that names another LATEST
        ("{tmp}/../elsewhere/run", "which is not a run under its storage root"),
        ("s3://another-bucket/runs/x", "which is not a run under its storage root"),
    ],
    ids=["another LATEST", "outside its storage", "another store"],
)
def test_a_latest_that_names_anything_but_a_run_beside_it_is_refused_in_one_line(
    tmp_path, capsys, pointer, expected
):
    latest, other = tmp_path / "job" / "LATEST", tmp_path / "job" / "OTHER" / "LATEST"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({"run": str(tmp_path / "runs" / "x")}))
    latest.write_text(json.dumps({"run": pointer.format(tmp=tmp_path)}))
    before = tree(tmp_path)
    assert main(["evaluate", "--from", str(latest)]) == 2
    line = one_line(capsys)
    assert f"--from {latest} names" in line and expected in line, line
    assert tree(tmp_path) == before  # evaluate writes into the run it evaluates: it never got one


def test_promote_refuses_a_run_outside_the_storage_of_its_latest(donor, tmp_path, capsys):
    target = tmp_path / "elsewhere" / "job" / "LATEST"
    assert main(["promote", "--run", str(donor), "--target", str(target)]) == 2
    assert f"may name only runs under {tmp_path / 'elsewhere'}" in one_line(capsys)
    assert not target.parent.exists()


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        (b'{"format": 1, "base": [], "space": []}', "is not a sweep.json this version reads"),
        (b"\xff\xfe not utf-8", "is not a sweep.json this version reads"),
    ],
    ids=["base not an object", "not UTF-8"],
)
def test_a_damaged_sweep_json_is_refused_naming_it(tmp_path, small_fashion_dir, capsys, no_ray, contents, expected):
    sweep = tmp_path / "sweeps" / "s"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_bytes(contents)
    argv = ["tune", "--data", "fashion-mnist", "--data-dir", str(small_fashion_dir), "--limit", "32", "--storage",
            str(tmp_path / "sweeps"), "--sweep", "s", "--space", "lr=1e-4,2e-4"]  # fmt: skip
    assert main(argv) == 2
    line = one_line(capsys)
    assert f"{sweep / 'sweep.json'} {expected}" in line, line
    assert tree(tmp_path / "sweeps") == {"s/sweep.json": contents}


def test_a_file_where_a_folder_belongs_and_a_folder_where_a_file_belongs_are_refused_at_once(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    started = time.monotonic()
    wrong_kinds = ((tmp_path / "folder", "(?i)is a directory"), (tmp_path / "file" / "inside", "(?i)not a directory"))
    for path, kind in wrong_kinds:
        with pytest.raises(StorageRefused, match=kind):
            resolve_location(str(path)).read_bytes()
    with pytest.raises(StorageRefused, match="Not a directory"):
        resolve_location(str(tmp_path / "file")).list_names()
    assert time.monotonic() - started < 5  # no retries: the retry budget is 120 s
    assert classify(NotADirectoryError(errno.ENOTDIR, "Not a directory")) == REFUSED
    assert classify(OSError("Cannot open for reading: path '/x' is a directory")) == REFUSED  # pyarrow, no errno
    assert classify(FileNotFoundError(errno.ENOENT, "gone")) == ABSENT


def test_a_state_file_written_by_hand_beside_a_good_checkpoint_is_named_not_loaded(donor, tmp_path, capsys):
    folder = checkpoint_folders(resolve_location(str(donor)))[0]
    (Path(folder.path) / STATE_FILE).write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["evaluate", "--from", folder.uri]) == 2
    assert f"checkpoint {folder.uri} is damaged" in one_line(capsys)
