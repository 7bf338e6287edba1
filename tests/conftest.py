"""Shared fixtures: real data, tiny IDX files, one local Ray cluster and one S3 server per session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from gan.data import IDX_FILES
from gan.idx import write_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets an empty cache, so nothing leaks between tests or from the user's home."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    for name in list(os.environ):
        if name.startswith("GAN_JOB_"):
            monkeypatch.delenv(name)
    return cache


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
        write_idx(folder / f"{IDX_FILES[split + '_images']}.gz", torch.randint(0, 256, (count, 28, 28), generator=rng, dtype=torch.uint8))
        write_idx(folder / f"{IDX_FILES[split + '_labels']}.gz", torch.randint(0, 10, (count,), generator=rng, dtype=torch.uint8))
    return folder


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "tiny-data")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster with 2 CPUs, shared by every Ray test of the session."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=True)
    yield ray
    ray.shutdown()
