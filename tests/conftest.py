"""Shared fixtures: real data, tiny IDX files, one local Ray cluster and one S3 server per session.

The S3 server's endpoint and credentials are never left in this process's environment: a test
that asks for `s3_server` has them (AWS_*) for that test only; the clusters and the subprocesses
that need them get them explicitly (`S3Server.env`), as a pod gets them from its Secret.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gan.classifier import DEFAULT_EPOCHS, cache_path, load_or_train_classifier
from gan.data import IDX_FILES, load_split
from gan.idx import write_idx
from job.config import TrainConfig
from job.runtime.local_session import LocalSession
from job.runtime.driver import SCRATCH, DriverRun
from job.runtime.loop import run_worker
from job.storage.location import resolve_location

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets an empty cache, so nothing leaks between tests or from the user's home."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    for name in list(os.environ):
        if name.startswith("GAN_JOB_"):
            monkeypatch.delenv(name)
    return cache


@pytest.fixture(scope="session", autouse=True)
def no_outside_aws_settings():
    """The caller's AWS_* settings (a profile, real keys, a CA bundle) reach no test: every test's S3 is
    the loopback server's, given only to the tests that ask for it."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        yield


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The real Fashion-MNIST files; `.ci/run` installs them with apt."""
    missing = [stem for stem in IDX_FILES.values() if not (FASHION_MNIST_DIR / f"{stem}.gz").exists()]
    assert not missing, f"install Debian's dataset-fashion-mnist (missing {missing})"
    return FASHION_MNIST_DIR


def write_tiny_dataset(folder: Path, num_train: int = 96, num_test: int = 32, seed: int = 0) -> Path:
    """Four small IDX files (gzipped) of random images and labels."""
    rng = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        write_idx(
            folder / f"{IDX_FILES[split + '_images']}.gz",
            torch.randint(0, 256, (count, 28, 28), generator=rng, dtype=torch.uint8),
        )
        write_idx(
            folder / f"{IDX_FILES[split + '_labels']}.gz",
            torch.randint(0, 10, (count,), generator=rng, dtype=torch.uint8),
        )
    return folder


@pytest.fixture(scope="session")
def small_fashion_dir(fashion_mnist_dir, tmp_path_factory) -> Path:
    """The first images of real Fashion-MNIST as four IDX files: a real subset on which the
    evaluation classifier trains in a second or two."""
    folder = tmp_path_factory.mktemp("small-fashion")
    for split, count in (("train", 1000), ("test", 500)):
        images = load_split(fashion_mnist_dir, split, count)
        write_idx(folder / f"{IDX_FILES[split + '_images']}.gz", images.images[:, 0])
        write_idx(folder / f"{IDX_FILES[split + '_labels']}.gz", images.labels)
    return folder


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "tiny-data")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    """A real S3 HTTP endpoint on loopback (moto's server, with credential checks on)."""

    url: str
    access_key: str
    secret_key: str
    bucket: str

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
        )  # fmt: skip

    @property
    def env(self) -> dict[str, str]:
        """The AWS settings a client of this server needs: what a pod gets from its Secret."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    @contextlib.contextmanager
    def environment(self):
        """`env` in this process's environment for the block only (for fixtures wider than a test)."""
        with pytest.MonkeyPatch.context() as patch:
            for name, value in self.env.items():
                patch.setenv(name, value)
            yield self

    def keys(self, prefix: str = "") -> list[str]:
        """The bucket's keys under `prefix`, in order."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        """Every object under `prefix`, key to bytes."""
        client = self.client()
        return {key: client.get_object(Bucket=self.bucket, Key=key)["Body"].read() for key in self.keys(prefix)}

    def metrics_rows(self, run_prefix: str) -> list[dict]:
        """The rows of a run's `artifacts/metrics.jsonl` in the bucket."""
        return parse_jsonl(self.read(f"{run_prefix}/artifacts/metrics.jsonl"))

    def upload(self, folder: Path, prefix: str) -> None:
        """Every file under `folder` to `prefix/<its relative path>`."""
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.put_object(
                    Bucket=self.bucket, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes()
                )


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def s3_service():
    """moto's standalone server on a free loopback port, with an IAM user whose keys it checks.

    Nothing goes into this process's environment: session and module fixtures pass `env` to what
    needs it; a test asks for `s3_server`. The keys are fake ones made for this session: tests look
    for them in every output and object.
    """
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},  # the 3 calls below set up the user
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}"
        iam = boto3.client(
            "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        iam.create_user(UserName="gan-job")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="gan-job", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="gan-job")["AccessKey"]
        s3 = S3Server(url, key["AccessKeyId"], key["SecretAccessKey"], "gan-job-test")
        s3.client().create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3_server(s3_service, monkeypatch) -> S3Server:
    """The session's S3 server, with its endpoint and credentials (AWS_*) in the environment for this test only."""
    for name, value in s3_service.env.items():
        monkeypatch.setenv(name, value)
    return s3_service


RAY_RETRY_BUDGET_S = 4.0  # the storage retry budget in the shared cluster's processes


@pytest.fixture(scope="session")
def ray_cluster(s3_service):
    """One local Ray cluster with 2 CPUs, shared by every Ray test of the session.

    Its processes (raylet, workers) keep the environment they start with, so the S3 settings are in
    the environment while it starts and not after: its workers have them, as pods have their
    Secret; this process's later tests do not.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    with s3_service.environment(), pytest.MonkeyPatch.context() as patch:
        # Storage retries bounded at seconds, not minutes, in its processes (workers, Ray Train's controller):
        # an outage the tests play ends the attempt quickly; the 1 s blips they play pass.
        patch.setenv("GAN_JOB_STORAGE_RETRY_S", str(RAY_RETRY_BUDGET_S))
        patch.setenv("GAN_JOB_STORAGE_TIMEOUT_S", "10")
        # Its GCS port picked up front, so that its processes get its address: Ray's helpers (Ray Train's placement
        # group cleaner) otherwise guess it, and fail while the autoscaling tests run a second cluster.
        gcs_port = free_port()
        patch.setenv("RAY_GCS_SERVER_PORT", str(gcs_port))
        # The trial drivers' slots of `gan-job tune`, as the manifests' heads declare them.
        # Its dashboard on: the cleaner asks the State API (the dashboard) whether a run's controller still lives.
        ray.init(num_cpus=2, resources={"gan_job_trial_driver": 8}, include_dashboard=True,
                 dashboard_port=free_port(), logging_level="ERROR", configure_logging=True,
                 _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}})  # fmt: skip
    yield ray
    ray.shutdown()


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


def job_env(*, s3: S3Server | None = None, **extra: str) -> dict[str, str]:
    """The environment of a `python -m job` subprocess: this process's, the checkout on PYTHONPATH,
    the S3 settings of `s3` when given, then `extra` (RAY_ADDRESS, HOME, ...)."""
    return {**os.environ, "PYTHONPATH": str(REPO), **(s3.env if s3 else {}), **extra}


def train_one_process(storage: Path, data_dir: Path, run_name: str = "run", **overrides) -> Path:
    """Train a run in this process with the real loop and no Ray (rank 0 of 1, CPU); returns its folder.

    Small by default (1 epoch, batch 32, one torch thread, no training-time evaluation);
    `overrides` are any TrainConfig fields.
    """
    values = {
        "data": "fashion-mnist", "data_dir": str(data_dir) if data_dir is not None else None, "epochs": 1,
        "batch_size": 32, "storage": str(storage), "run_name": run_name, "cpus_per_worker": 1, "eval_every": 0,
    }  # fmt: skip
    config = TrainConfig(**{**values, **overrides})
    run_worker(
        config,
        LocalSession(
            resolve_location(config.storage).child(config.run_name), torch.device("cpu"), config.keep_checkpoints
        ),
    )
    return storage / run_name


def driver_run(config: TrainConfig) -> DriverRun:
    """`config` as the driver hands a new run to Ray Train, without the driver's checks (no data is read)."""
    storage = resolve_location(config.storage)
    return DriverRun(config, storage, storage.child(config.run_name), SCRATCH)


# What a finished two-epoch run leaves in its artifacts/ folder.
TWO_EPOCH_ARTIFACTS = ("metrics.jsonl", "samples/epoch_001.png", "samples/epoch_002.png", "losses.png", "generator.pt",
                       "model.json")  # fmt: skip


def parse_jsonl(text: str | bytes) -> list[dict]:
    """The objects of a JSON-lines text (metrics.jsonl, promotions.jsonl), blank lines skipped."""
    if isinstance(text, bytes):
        text = text.decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def metrics_rows(run: Path) -> list[dict]:
    """The rows of a local run's `artifacts/metrics.jsonl` (none before its first epoch)."""
    try:
        text = (run / "artifacts" / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return parse_jsonl(text)


def knobs_loaded_by(container: dict, objects: list[dict]) -> dict[str, str]:
    """The GAN_JOB_* knobs of the ConfigMaps a container loads with envFrom, from built manifests."""
    maps = {s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s}
    return {
        key: value
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] in maps
        for key, value in o.get("data", {}).items()
        if key.startswith("GAN_JOB_")
    }


@functools.cache
def load_fake_cluster_module():
    """deploy/fake_cluster.py, the local autoscaling cluster that `deploy/run-local.sh --autoscaling` starts too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fake_cluster", REPO / "deploy" / "fake_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_cluster"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@functools.cache
def built_overlay(overlay: str) -> tuple[dict, ...]:
    """The objects of deploy/overlays/<overlay> (`kubectl kustomize`, as deploy/fake_cluster.py builds them),
    once per session."""
    return tuple(load_fake_cluster_module().built_overlay(overlay))


@pytest.fixture(scope="module")
def autoscaling_cluster(s3_service, small_fashion_dir):
    """A real autoscaling multi-node Ray cluster shaped like the local overlay's standing RayCluster.

    Per module (one module uses it): its head, GCS and autoscaler (updating every second) stop when
    that module ends, instead of taking CPU from the rest of the session.

    A 0-CPU head and no worker nodes until the autoscaler (Ray's classic one, with the fake
    multi-node provider) starts them. Its timings are shortened so that tests see nodes come and go
    in seconds. The head carries the local overlay's knobs, as the head pod loads the ConfigMap,
    shortened for CI and pointed at the S3 server and a real Fashion-MNIST subset (small, so that a
    promotion trains its classifier in seconds); the S3 settings are in the head's environment,
    as a pod gets them from its Secret.
    """
    fake_cluster = load_fake_cluster_module()
    objects = list(built_overlay("local"))
    standing = next(o for o in objects if o["kind"] == "RayCluster")
    knobs = knobs_loaded_by(standing["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0], objects)
    knobs.update(
        GAN_JOB_STORAGE=f"s3://{s3_service.bucket}/standing",
        GAN_JOB_DATA="fashion-mnist",
        GAN_JOB_DATA_DIR=str(small_fashion_dir),
        GAN_JOB_EPOCHS="1",
        GAN_JOB_LIMIT="512",
        GAN_JOB_EVAL_EVERY="0",
    )
    timings = fake_cluster.Timings(update_interval_s=1, heartbeat_timeout_s=10, idle_timeout_s=10,
                                   health_check_period_ms=1000, health_check_failure_threshold=3)  # fmt: skip
    cluster = fake_cluster.FakeCluster(
        fake_cluster.standing_shape(objects), timings, env={**knobs, **s3_service.env}
    ).start()
    try:
        yield cluster
    finally:
        cluster.stop()


# The classifier `evaluate` trains on the small data (test_evaluate, test_promote, ...).
@pytest.fixture(scope="session")
def trained_classifier_file(small_fashion_dir, tmp_path_factory):
    """The classifier `evaluate` would train on the small data, trained once for the session."""
    train_set = load_split(small_fashion_dir, "train")
    cache = tmp_path_factory.mktemp("classifier-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        load_or_train_classifier(
            "fashion-mnist", train_set.images, train_set.labels, train_set.fingerprint, epochs=DEFAULT_EPOCHS
        )
        path = cache_path("fashion-mnist", train_set.fingerprint, 0)
    return path, path.relative_to(cache)


@pytest.fixture
def cached_classifier(trained_classifier_file, isolated_home):
    """Put the session's classifier into this test's empty cache, where `evaluate` looks first."""
    source, relative = trained_classifier_file
    target = isolated_home / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return target
