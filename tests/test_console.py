"""A run's console holds the project's own lines, and Ray's only where they help a user.

The README's run command, a little shorter, in a process of its own that starts its own local cluster
(as a user's does) while the suite's shared cluster runs beside it: every line it prints is one
the project wrote, or one of Ray's that says the worker group started (the named patterns below).
Ray's token-authentication notice, its per-report lines, the preemption watcher's error and the
placement group cleaner's traceback (which a second cluster on the machine used to cause) are gone.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import subprocess
import sys

import pytest

from job.runtime.local_cluster import RAY_AUTH_LOGGER
from tests.conftest import job_env

pytestmark = pytest.mark.ray

# Lines of Ray's that help a user: where the run's workers are, in a successful run.
RAY_PATTERNS = {
    "resources requested": r"Requesting resources: \{.*\} \* \d+",
    "worker group starting": r"Attempting to start training worker group of size \d+ with the following resources: .*",
    "worker group started": r"Started training worker group of size \d+: ?",
    "a worker of the group": r"- \(ip=[0-9.]+, pid=\d+\) world_rank=\d+, local_rank=\d+, node_rank=\d+",
    "process group": r"Setting up process group for: env:// \[rank=\d+, world_size=\d+\]",
}
# The project's own lines (job/ and its status lines), as they start.
PROJECT_PATTERNS = [
    r"data \S+: [\d,]+ training and [\d,]+ test images, ",
    r"training run \S+: ",
    r"epoch \d+/\d+  loss_d ",
    r"  epoch \d+/\d+ step ",
    r"done: \d+ epochs, \d+ steps; artifacts in ",
    r"run \S+ finished: checkpoints and artifacts in ",
    r"resuming run ",
    r"warning: ",
    r"note: ",
]
RAY_PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\((?:RayTrainWorker|TrainController) pid=\d+\)(?:\x1b\[0m)? ")


def unknown_lines(console: str) -> list[str]:
    """The lines neither the project wrote nor one of RAY_PATTERNS matches."""
    unknown = []
    for line in console.splitlines():
        body = RAY_PREFIX.sub("", line)
        if not line.strip() or any(re.match(p, body) for p in PROJECT_PATTERNS):
            continue
        if RAY_PREFIX.match(line) and any(re.fullmatch(p, body.strip()) for p in RAY_PATTERNS.values()):
            continue
        unknown.append(line)
    return unknown


def test_a_short_local_run_prints_only_the_projects_lines_and_rays_useful_ones(
    ray_cluster, fashion_mnist_dir, tmp_path
):
    # The README's run command with less data and no training-time evaluation (its classifier would be
    # trained first in this test's empty cache): the same kinds of lines, in less time.
    argv = [sys.executable, "-m", "job", "train", "--data", "fashion-mnist", "--data-dir", str(fashion_mnist_dir),
            "--epochs", "2", "--limit", "512", "--eval-every", "0", "--num-workers", "2",
            "--storage", str(tmp_path / "runs"), "--run-name", "first"]  # fmt: skip
    env = job_env()
    env.pop("RAY_ADDRESS", None)  # its own local cluster, beside the suite's
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert re.search(r"epoch 2/2  loss_d ", console) and "run first finished" in console
    unknown = unknown_lines(console)
    assert unknown == [], "lines neither the project's nor Ray's useful ones:\n" + "\n".join(unknown)


def test_the_auth_notice_comes_from_the_logger_train_quiets():
    """A Ray upgrade that moves the notice to another logger fails here, not silently on a user's console."""
    module = importlib.import_module(RAY_AUTH_LOGGER)
    assert module.logger is logging.getLogger(RAY_AUTH_LOGGER)
    assert "Token authentication is enabled" in inspect.getsource(module._warn_token_auth_enabled)
