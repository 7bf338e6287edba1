"""Ctrl-C and SIGTERM during a local `gan-job train`: exit status 130 or 143, the one line "interrupted", no process
of the cluster it started left, and the same command again resumes the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import job_env, metrics_rows

DEADLINE_S = 240  # a hang guard, not a speed check


def ray_processes_of(root: int, raylets: set[int]) -> set[int]:
    """`root`'s descendants, and every process that names one of `raylets` as its raylet (a worker whose raylet
    ended first is no longer anyone's descendant)."""
    parents, named = {}, set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(line.startswith(b"RAY_RAYLET_PID=") and int(line[15:] or 0) in raylets for line in environ):
            named.add(int(entry.name))
    tree, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return tree | named


def alive(pids: set[int]) -> set[int]:
    running = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.add(pid)
        except OSError:
            pass
    return running


def raylet_pids(pids: set[int]) -> set[int]:
    found = set()
    for pid in pids:
        try:
            if b"raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            pass
    return found


def run_train(argv: list[str], log: Path) -> subprocess.Popen:
    env = job_env()
    env.pop("RAY_ADDRESS", None)  # a cluster of its own, as a user's first `gan-job train`
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "job", *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def reached(moment: str, run: Path, seen: set[int]) -> bool:
    if moment == "starting":
        return bool(raylet_pids(seen))  # the cluster is coming up
    if moment == "training":
        return bool(metrics_rows(run))  # an epoch is recorded: the next one is training
    return any(run.glob("checkpoint_*"))  # a checkpoint folder appears: its files are being written


@pytest.mark.parametrize(
    ("moment", "signum", "to_group", "status"),
    [
        ("starting", signal.SIGINT, True, 130),  # Ctrl-C in a terminal: the whole foreground process group
        ("training", signal.SIGINT, True, 130),
        ("checkpoint", signal.SIGTERM, False, 143),  # as Kubernetes stops a pod: the main process alone
    ],
)
def test_an_interrupted_local_run_stops_its_whole_cluster_in_one_line_and_resumes(
    tmp_path, small_fashion_dir, moment, signum, to_group, status
):
    storage, log = tmp_path / "runs", tmp_path / "train.log"
    argv = ["train", "--data", "fashion-mnist", "--data-dir", str(small_fashion_dir), "--limit", "512",
            "--batch-size", "32", "--epochs", "3", "--num-workers", "2", "--cpus-per-worker", "1", "--eval-every", "0",
            "--storage", str(storage), "--run-name", "r"]  # fmt: skip
    process = run_train(argv, log)
    seen: set[int] = set()
    deadline = time.monotonic() + DEADLINE_S
    while not reached(moment, storage / "r", seen) and process.poll() is None and time.monotonic() < deadline:
        seen |= ray_processes_of(process.pid, raylet_pids(seen))
        time.sleep(0.1)
    assert process.poll() is None, log.read_text()[-2000:]
    seen |= ray_processes_of(process.pid, raylet_pids(seen))
    if to_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    assert process.wait(timeout=120) == status
    lines = [line for line in log.read_text().splitlines() if "gan-job" in line or "Traceback" in line]
    assert lines[-1:] == ["gan-job: interrupted"] and not any("Traceback" in line for line in lines), lines
    time.sleep(1)
    assert alive(seen) == set(), [Path(f"/proc/{pid}/cmdline").read_bytes()[:60] for pid in alive(seen)]
    if moment != "checkpoint":
        return
    # The same command again resumes the run: each epoch recorded once, the last one finished.
    resumed = run_train(argv, log)
    assert resumed.wait(timeout=DEADLINE_S) == 0, log.read_text()[-2000:]
    assert "resuming run r at epoch" in log.read_text()
    assert [row["epoch"] for row in metrics_rows(storage / "r")] == [1, 2, 3]
