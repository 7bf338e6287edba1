"""End to end with the real `ray job submit`: the local overlay's RayJob entrypoint, run against a
Ray head started on loopback (token authentication on) with its checkpoints in the S3 server.

This is what KubeRay does on a cluster (deploy/run-local.sh does the same for a person), minus
Kubernetes itself, which cannot run here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, knobs_loaded_by
from tests.test_deploy import build

pytestmark = [pytest.mark.ray, pytest.mark.s3]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def rayjob_and_knobs(overlay: str = "local") -> tuple[str, dict[str, str]]:
    """The RayJob's entrypoint and the GAN_JOB_* knobs its head loads, from the built overlay."""
    objects = build(overlay)
    rayjob = next(o for o in objects if o["kind"] == "RayJob")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return rayjob["spec"]["entrypoint"], knobs_loaded_by(head, list(objects))


def wait_for_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception as err:
            if getattr(err, "code", None):  # any HTTP answer (401 included): the server is up
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not come up") from None
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    """`ray start --head` on loopback with free ports, its own temp folder and its own token."""
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="gjr-", dir="/tmp"))
    token = secrets.token_hex(32)
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                            "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port")}  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    args = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "2",
            "--temp-dir", str(temp / "ray"), "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--min-worker-port", "0", "--max-worker-port", "0"]  # fmt: skip
    for name, port in ports.items():
        args += [f"--{name}", str(port)]
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_http(f"{address}/api/version", 120)
        yield {"address": address, "gcs": f"127.0.0.1:{ports['port']}", "token": token, "env": env}
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def submit(ray_head: dict, entrypoint: str, env: dict[str, str], run_name: str, timeout_s: float = 420) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir .` through a shell, as KubeRay's submitter pod runs it."""
    # Knobs go with the job; S3 credentials stay in the head's environment, as on Kubernetes.
    runtime_env = {"env_vars": {"RAY_ADDRESS": ray_head["gcs"], **{k: v for k, v in env.items() if k.startswith("GAN_JOB_")}}}
    command = " ".join([
        shlex.quote(str(BIN / "ray")), "job", "submit", "--address", ray_head["address"], "--working-dir", shlex.quote(str(REPO)),
        "--runtime-env-json", shlex.quote(json.dumps(runtime_env)), "--", entrypoint,
    ])  # fmt: skip
    return subprocess.run(["bash", "-c", command], env={**env, "RAYJOB_NAME": run_name}, capture_output=True, text=True, timeout=timeout_s)


def test_rayjob_entrypoint_trains_checkpoints_to_s3_and_promotes_under_ray_job_submit(ray_head, s3_server, fashion_mnist_dir):
    entrypoint, knobs = rayjob_and_knobs("local")
    # The manifest's knobs, shortened for CI: fewer images, one epoch, the data from the Debian copy.
    env = {**ray_head["env"], **knobs, "GAN_JOB_EPOCHS": "1", "GAN_JOB_LIMIT": "512", "GAN_JOB_NUM_WORKERS": "2",
           "GAN_JOB_CPUS_PER_WORKER": "1", "GAN_JOB_DATA": "fashion-mnist", "GAN_JOB_DATA_DIR": str(fashion_mnist_dir),
           "GAN_JOB_STORAGE": f"s3://{s3_server.bucket}/e2e", "GAN_JOB_EVAL_EVERY": "0"}  # fmt: skip
    done = submit(ray_head, entrypoint, env, run_name="e2e-run")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "succeeded" in output.lower()
    keys = set(s3_server.objects())
    assert any(k.startswith("e2e/e2e-run/checkpoint_") and k.endswith("/state.pt") for k in keys), sorted(keys)[:20]
    assert "e2e/e2e-run/artifacts/metrics.jsonl" in keys
    # ... and then promoted it: the first finished run becomes LATEST.
    latest = json.loads(s3_server.objects()["e2e/gan/LATEST"])
    assert latest["run"].rstrip("/").endswith("e2e/e2e-run")


def test_submission_without_the_token_is_refused(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(Path(ray_head["env"].get("TMPDIR", "/tmp")) / f"no-token-home-{os.getpid()}")  # no ~/.ray/auth_token either
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--", "true"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "401" in done.stdout + done.stderr or "auth" in (done.stdout + done.stderr).lower()
