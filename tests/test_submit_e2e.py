"""End to end with the real `ray job submit`: the local overlay's RayJob entrypoint, run against a
Ray head started on loopback (token authentication on) with its checkpoints in the S3 server.

This is what KubeRay does on a cluster (deploy/run-local.sh does the same for a person), minus
Kubernetes itself, which cannot run here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, built_overlay, knobs_loaded_by

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def rayjob_and_knobs(overlay: str = "local") -> tuple[str, dict[str, str]]:
    """The RayJob's entrypoint and the GAN_JOB_* knobs its head loads, from the built overlay."""
    objects = built_overlay(overlay)
    rayjob = next(o for o in objects if o["kind"] == "RayJob")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return rayjob["spec"]["entrypoint"], knobs_loaded_by(head, list(objects))


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
