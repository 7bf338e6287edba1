"""Runs, data and checkpoints in an S3 bucket (a real S3 endpoint on loopback)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gan.data import iterate_batches, load_split
from job.cli import main
from job.storage.data_source import fetch_from_bucket
from tests.conftest import free_port, job_env, write_tiny_dataset

pytestmark = [pytest.mark.s3]


@pytest.fixture(scope="module")
def pushed_data(s3_service, fashion_mnist_dir):
    """Fashion-MNIST uploaded with `data push`, as a user does for an offline cluster."""
    uri = f"s3://{s3_service.bucket}/datasets/fashion-mnist"
    with s3_service.environment():
        assert main(["data", "push", "--data", "fashion-mnist", "--data-dir", str(fashion_mnist_dir), "--to", uri]) == 0
    return uri


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3_service, pushed_data):
    """2 workers, 2 epochs, data from and run to the bucket."""
    argv = [
        "train", "--data", "fashion-mnist", "--data-dir", pushed_data, "--limit", "1000", "--epochs", "2",
        "--num-workers", "2", "--storage", f"s3://{s3_service.bucket}/runs", "--run-name", "s3run", "--eval-every", "0",
    ]  # fmt: skip
    with s3_service.environment():
        assert main(argv) == 0
    return argv, "runs/s3run"


@pytest.mark.ray
def test_a_test_that_does_not_ask_for_s3_sees_no_aws_settings(s3_service, ray_cluster):
    """With the S3 server and the Ray cluster up (both for the whole session), a test that did not ask
    for `s3_server` has no AWS_* in its environment; the cluster's workers have them, as pods have their Secret."""
    assert "AWS_ENDPOINT_URL" not in os.environ
    assert [name for name in os.environ if name.startswith("AWS_")] == []

    @ray_cluster.remote(num_cpus=0)
    def worker_settings() -> dict[str, str]:
        return {name: value for name, value in os.environ.items() if name.startswith("AWS_")}

    assert ray_cluster.get(worker_settings.remote(), timeout=60) == s3_service.env


@pytest.mark.ray
def test_two_workers_two_epochs_put_checkpoints_and_metrics_in_the_bucket(s3_server, s3_run):
    _, prefix = s3_run
    keys = set(s3_server.objects())
    assert any(k.startswith(f"{prefix}/checkpoint_") and k.endswith("/state.pt") for k in keys)
    for name in ("metrics.jsonl", "samples/epoch_002.png", "generator.pt", "model.json", "losses.png"):
        assert f"{prefix}/artifacts/{name}" in keys
    assert [row["epoch"] for row in s3_server.metrics_rows(prefix)] == [1, 2]


@pytest.mark.ray
def test_resume_from_the_bucket_alone_on_an_empty_node(s3_server, s3_run, tmp_path):
    """A fresh driver and a fresh Ray cluster with empty HOME, cache and working folder."""
    argv, prefix = s3_run
    before = s3_server.metrics_rows(prefix)
    empty_home, empty_cache, empty_cwd = (tmp_path / n for n in ("home", "cache", "cwd"))
    for folder in (empty_home, empty_cache, empty_cwd):
        folder.mkdir()
    env = job_env(s3=s3_server, HOME=str(empty_home), XDG_CACHE_HOME=str(empty_cache), RAY_ADDRESS="local")
    epochs = argv.index("--epochs") + 1
    resumed = subprocess.run(
        [sys.executable, "-m", "job", *argv[:epochs], "3", *argv[epochs + 1 :], "--cpus-per-worker", "1"],
        cwd=empty_cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming run s3run at epoch 3" in resumed.stdout + resumed.stderr
    rows = s3_server.metrics_rows(prefix)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[:2] == before and rows[2]["step"] == 12
    assert list(empty_cache.rglob("train-images-idx3-ubyte*")), "data should come from the bucket into the empty cache"
    assert not list(empty_cwd.iterdir())


@pytest.mark.ray
def test_generate_from_an_s3_run_writes_a_grid(s3_server, s3_run, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "--from", f"s3://{s3_server.bucket}/{s3_run[1]}", "--num", "16", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ray
def test_no_credential_appears_in_any_object_or_output(s3_server, s3_run, capfd):
    # The run above had these keys in its environment; look for them everywhere it wrote.
    secrets = (s3_server.secret_key, s3_server.access_key)
    for key, body in s3_server.objects().items():
        for secret in secrets:
            assert secret.encode() not in body, key
    output = capfd.readouterr()
    assert not any(secret in output.out + output.err for secret in secrets)


def test_data_from_the_bucket_gives_the_same_first_batch_as_the_local_files(s3_server, tmp_path):
    local = write_tiny_dataset(tmp_path / "local", num_train=40)
    uri = f"s3://{s3_server.bucket}/datasets/tiny-{tmp_path.name}"
    assert main(["data", "push", "--data", "mnist", "--data-dir", str(local), "--to", uri]) == 0
    fetched = fetch_from_bucket(uri)
    assert fetched != local
    order = torch.arange(40)
    first_local = next(iterate_batches(load_split(local).images, order, 8))
    first_s3 = next(iterate_batches(load_split(fetched).images, order, 8))
    assert torch.equal(first_local, first_s3)


def test_a_damaged_file_in_the_bucket_is_refused(s3_server, tmp_path):
    local = write_tiny_dataset(tmp_path / "local")
    uri = f"s3://{s3_server.bucket}/datasets/damaged-{tmp_path.name}"
    assert main(["data", "push", "--data", "mnist", "--data-dir", str(local), "--to", uri]) == 0
    key = f"datasets/damaged-{tmp_path.name}/train-images-idx3-ubyte.gz"
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=key, Body=b"not an idx file")
    from gan.data import DataError

    with pytest.raises(DataError, match="train-images"):
        fetch_from_bucket(uri)


def _train_to(storage: str, data_dir: Path, tmp_path: Path, capsys, env: dict | None = None) -> tuple[int, str, float]:
    start = time.monotonic()
    argv = [
        "train",
        "--data",
        "fashion-mnist",
        "--data-dir",
        str(data_dir),
        "--storage",
        storage,
        "--run-name",
        "never",
    ]
    code = main(argv)
    return code, capsys.readouterr().err.strip(), time.monotonic() - start


def test_unreachable_endpoint_fails_fast_with_one_line(s3_server, tiny_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    code, err, took_s = _train_to(f"s3://{s3_server.bucket}/runs", tiny_data_dir, tmp_path, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "cannot reach the S3 endpoint" in err
    assert took_s < 30  # guards against a hang, not a speed claim


def test_wrong_credentials_are_named_without_showing_them(s3_server, tiny_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-right-secret")
    code, err, took_s = _train_to(f"s3://{s3_server.bucket}/runs", tiny_data_dir, tmp_path, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "credentials were refused" in err
    assert "not-the-right-secret" not in err and s3_server.access_key not in err
    assert took_s < 30


def test_missing_bucket_is_named_and_create_bucket_creates_it(s3_server, tiny_data_dir, tmp_path, capsys):
    code, err, took_s = _train_to("s3://no-such-bucket-here/runs", tiny_data_dir, tmp_path, capsys)
    assert (
        code == 2
        and len(err.splitlines()) == 1
        and "'no-such-bucket-here' does not exist" in err
        and "--create-bucket" in err
    )
    assert took_s < 30
    from job.storage.s3_preflight import check_bucket

    check_bucket("s3://created-by-preflight/runs", None, create=True)
    s3_server.client().head_bucket(Bucket="created-by-preflight")
