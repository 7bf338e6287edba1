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
from pathlib import Path

import pytest

from tests.conftest import built_overlay, knobs_loaded_by, load_fake_cluster_module

pytestmark = [pytest.mark.ray, pytest.mark.s3]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def rayjob_and_knobs(overlay: str = "local") -> tuple[str, dict[str, str]]:
    """The RayJob's entrypoint and the GAN_JOB_* knobs its head loads, from the built overlay."""
    objects = built_overlay(overlay)
    rayjob = next(o for o in objects if o["kind"] == "RayJob")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return rayjob["spec"]["entrypoint"], knobs_loaded_by(head, list(objects))


@pytest.fixture(scope="module")
def ray_head(s3_service, tmp_path_factory):
    """`ray start --head` on loopback with free ports, its own temp folder and its own token.

    The S3 settings are in the head's environment only, as a head pod gets them from its Secret:
    `env`, what a client (the submitter) runs with, has none.
    """
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="gjr-", dir="/tmp"))
    token = secrets.token_hex(32)
    fake_cluster = load_fake_cluster_module()  # its port list and its wait: the same `ray start --head` on loopback
    ports = dict(zip(fake_cluster.RAY_PORT_FLAGS, fake_cluster.free_ports(len(fake_cluster.RAY_PORT_FLAGS))))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    assert not [name for name in env if name.startswith("AWS_")]
    args = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "2",
            "--temp-dir", str(temp / "ray"), "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--min-worker-port", "0", "--max-worker-port", "0"]  # fmt: skip
    for name, port in ports.items():
        args += [f"--{name}", str(port)]
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(
        args, env={**env, **s3_service.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        fake_cluster.wait_for_http(f"{address}/api/version", 120)
        yield {"address": address, "gcs": f"127.0.0.1:{ports['port']}", "token": token, "env": env}
    finally:
        # As FakeCluster.stop: SIGTERM, which `ray start --block` answers by stopping the head's
        # processes, slowly (half a minute at times); what is left after 10 s is killed.
        leftovers = fake_cluster.descendants(head.pid)
        head.terminate()
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        fake_cluster.kill_all(leftovers)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def submit(
    ray_head: dict, entrypoint: str, env: dict[str, str], run_name: str, timeout_s: float = 420
) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir .` through a shell, as KubeRay's submitter pod runs it."""
    # Knobs go with the job; S3 credentials stay in the head's environment, as on Kubernetes.
    runtime_env = {
        "env_vars": {"RAY_ADDRESS": ray_head["gcs"], **{k: v for k, v in env.items() if k.startswith("GAN_JOB_")}}
    }
    command = " ".join([
        shlex.quote(str(BIN / "ray")), "job", "submit", "--address", ray_head["address"],
        "--working-dir", shlex.quote(str(REPO)), "--runtime-env-json", shlex.quote(json.dumps(runtime_env)),
        "--", entrypoint,
    ])  # fmt: skip
    return subprocess.run(
        ["bash", "-c", command], env={**env, "RAYJOB_NAME": run_name}, capture_output=True, text=True, timeout=timeout_s
    )


def test_rayjob_entrypoint_trains_checkpoints_to_s3_and_promotes_under_ray_job_submit(
    ray_head, s3_service, small_fashion_dir
):
    entrypoint, knobs = rayjob_and_knobs("local")
    # The manifest's knobs, shortened for CI: fewer images, one epoch, the data a real Fashion-MNIST
    # subset (small, so that the promotion trains its classifier in seconds).
    env = {**ray_head["env"], **knobs, "GAN_JOB_EPOCHS": "1", "GAN_JOB_LIMIT": "512", "GAN_JOB_NUM_WORKERS": "2",
           "GAN_JOB_CPUS_PER_WORKER": "1", "GAN_JOB_DATA": "fashion-mnist", "GAN_JOB_DATA_DIR": str(small_fashion_dir),
           "GAN_JOB_STORAGE": f"s3://{s3_service.bucket}/e2e", "GAN_JOB_EVAL_EVERY": "0"}  # fmt: skip
    done = submit(ray_head, entrypoint, env, run_name="e2e-run")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "succeeded" in output.lower()
    keys = set(s3_service.keys("e2e/"))
    assert any(k.startswith("e2e/e2e-run/checkpoint_") and k.endswith("/state.pt") for k in keys), sorted(keys)[:20]
    assert "e2e/e2e-run/artifacts/metrics.jsonl" in keys
    # ... and then promoted it: the first finished run becomes LATEST.
    latest = json.loads(s3_service.read("e2e/gan/LATEST"))
    assert latest["run"].rstrip("/").endswith("e2e/e2e-run")


def test_submission_without_the_token_is_refused(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(
        Path(ray_head["env"].get("TMPDIR", "/tmp")) / f"no-token-home-{os.getpid()}"
    )  # no ~/.ray/auth_token either
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--", "true"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "401" in done.stdout + done.stderr or "auth" in (done.stdout + done.stderr).lower()
