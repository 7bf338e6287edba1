"""Faults while writing: a write that dies in the middle leaves the object as it was, never a part of
the new one that a reader (or a later resume) would take as whole; and a full local disk during a
checkpoint write fails the attempt, saying so, with nothing lost.

In the bucket, `tests/faultproxy.py` forwards half of each upload's body and then resets the
connection, for longer than the retry budget. On a local disk, the write stops halfway with
ENOSPC (injected), and the checkpoint goes to a tmpfs too small for it (mounted by the test where
the machine allows it, as root does here; elsewhere the same error is injected, and the test says so).
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from job.config import TrainConfig
from job.errors import StorageFailed
from job.runtime.local_session import LocalSession
from job.runtime.loop import run_worker
from job.storage.artifacts import RunArtifacts
from job.storage.checkpoint import checkpoint_folders, read_checkpoint
from job.storage.location import resolve_location
from job.storage.pointer import Store, pointer_bytes
from job.storage.tensorboard import EpochWriter
from tests.conftest import metrics_rows, parse_jsonl
from tests.faultproxy import FaultProxy
from tests.test_tensorboard import PNG_1x1, row

BUDGET_S, TIMEOUT_S = 1.0, 1.0


def _first_and_second(kind: str, location_of, uri: str) -> tuple:
    """A writer for `kind`: writes version 1 or 2 of the object at `uri` (location_of(uri) -> Location)."""
    if kind == "metrics.jsonl":
        rows = {1: [row(1, 0.5)], 2: [row(1, 0.5), row(2, 0.4)]}
        return lambda version: RunArtifacts(location_of(uri)).write_metrics(rows[version])
    if kind == "sample grid":
        grids = {1: PNG_1x1, 2: PNG_1x1 + b"-second"}
        return lambda version: RunArtifacts(location_of(uri)).write_sample_grid(1, grids[version])
    if kind == "TensorBoard file":  # in a bucket the attempt's file goes up whole after each epoch
        writer = EpochWriter(location_of(uri).child("artifacts"), 1, {"epochs": 2})

        def log(version: int) -> None:
            writer.folder = location_of(uri).child("artifacts", "tensorboard")  # a client of the endpoint in force now
            writer.log_epoch(row(version, 0.5), None)

        return log
    if kind == "LATEST":

        def write(version: int) -> None:
            store = Store()  # a client of the endpoint in force now
            target = location_of(uri).child("job", "LATEST")
            store.write(target, pointer_bytes({"run": f"run-{version}"}), store.read(target).token)

        return write
    raise ValueError(kind)


KINDS = ["metrics.jsonl", "sample grid", "TensorBoard file", "LATEST"]
KEY_OF = {
    "metrics.jsonl": "metrics.jsonl",
    "sample grid": "epoch_001.png",
    "TensorBoard file": "events.out",
    "LATEST": "LATEST",
}


@pytest.mark.s3
@pytest.mark.parametrize("kind", KINDS)
def test_an_upload_cut_in_the_middle_leaves_the_object_as_it_was(kind, s3_server, monkeypatch, tmp_path):
    monkeypatch.setenv("GAN_JOB_STORAGE_RETRY_S", str(BUDGET_S))
    monkeypatch.setenv("GAN_JOB_STORAGE_TIMEOUT_S", str(TIMEOUT_S))
    prefix = f"writes-{uuid.uuid4().hex[:6]}"
    uri = f"s3://{s3_server.bucket}/{prefix}"
    write = _first_and_second(kind, lambda u: resolve_location(u), uri)
    write(1)
    before = s3_server.objects(f"{prefix}/")

    proxy = FaultProxy(
        int(s3_server.url.rsplit(":", 1)[1]), lambda method, target: method == "PUT" and KEY_OF[kind] in target,
        outage_s=30, fault="cut", affects=lambda method, target: method == "PUT" and KEY_OF[kind] in target,
    )  # fmt: skip
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        with pytest.raises(StorageFailed, match="failed after"):
            write(2)
    finally:
        proxy.close()
    assert proxy.dropped, "no upload was cut"
    after = s3_server.objects(f"{prefix}/")
    assert after == before  # the old object whole; no part of the new one anywhere
    if kind == "metrics.jsonl":
        assert [r["epoch"] for r in parse_jsonl(after[f"{prefix}/artifacts/metrics.jsonl"])] == [1]


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "TensorBoard file"])  # locally it appends
def test_a_local_write_that_stops_halfway_leaves_the_file_as_it_was(kind, tmp_path, monkeypatch, capsys):
    uri = str(tmp_path / "run")
    write = _first_and_second(kind, lambda u: resolve_location(u), uri)
    write(1)
    before = {p: p.read_bytes() for p in sorted(Path(uri).rglob("*")) if p.is_file() and not p.name.endswith(".lock")}
    real_fdopen = os.fdopen

    class HalfWrite(io.RawIOBase):
        """A handle whose write stops halfway with a full disk."""

        def __init__(self, handle):
            self.handle = handle

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(bytes(data)[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: HalfWrite(real_fdopen(fd, mode, *a, **k)))
    with pytest.raises(StorageFailed, match="No space left on device"):
        write(2)
    monkeypatch.undo()
    after = {p: p.read_bytes() for p in sorted(Path(uri).rglob("*")) if p.is_file() and not p.name.endswith(".lock")}
    assert after == before  # no temporary file left, nothing replaced


# A full local disk during a checkpoint write ---------------------------------------------------

CHECKPOINT_ROOM = "40m"  # one checkpoint of the tutorial's networks (about 30 MB) fits, a second does not


def _mount_small_tmpfs(folder: Path) -> bool:
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={CHECKPOINT_ROOM}", "tmpfs", str(folder)], capture_output=True
    )
    return mounted.returncode == 0


def test_a_disk_that_fills_up_during_a_checkpoint_write_fails_the_attempt_saying_so_and_loses_nothing(
    tiny_data_dir, tmp_path, monkeypatch
):
    storage = tmp_path / "small-disk"
    mounted = _mount_small_tmpfs(storage)
    try:
        if not mounted:  # no mount allowed here: the second checkpoint's write meets the same error, injected
            print("tmpfs could not be mounted: ENOSPC is injected into the second checkpoint's write")
            real = resolve_location(str(storage)).__class__._write_once

            def fill_up(self, data):
                if (
                    self.path.endswith("state.pt")
                    and len(checkpoint_folders(resolve_location(str(storage)).child("run"))) >= 1
                ):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(self, data)

            monkeypatch.setattr("job.storage.location.Location._write_once", fill_up)
        config = TrainConfig(
            data="fashion-mnist",
            data_dir=str(tiny_data_dir),
            epochs=1,
            batch_size=32,
            storage=str(storage),
            run_name="run",
            cpus_per_worker=1,
            eval_every=0,
            keep_checkpoints=5,
        )
        run = resolve_location(str(storage)).child("run")
        run_worker(config, LocalSession(run, torch.device("cpu"), config.keep_checkpoints))
        first = checkpoint_folders(run)
        assert len(first) == 1
        kept = {p: p.read_bytes() for p in (Path(first[0].path)).iterdir()}

        with pytest.raises(StorageFailed, match="No space left on device") as caught:
            run_worker(config.replace(epochs=2), LocalSession(run, torch.device("cpu"), config.keep_checkpoints))
        assert "\n" not in str(caught.value) and "state.pt" in str(caught.value)  # one line, naming the file
        # Nothing lost: epoch 1's checkpoint is whole and loads, no half-written file is left behind ...
        assert [f.path for f in checkpoint_folders(run)][-1] == first[0].path
        assert {p: p.read_bytes() for p in Path(first[0].path).iterdir()} == kept
        assert read_checkpoint(first[0])["epoch"] == 1
        assert not [p for p in storage.rglob(".tmp-*")]
        # ... and with room again, the resume records each epoch once (epoch 2's row, written before its
        # checkpoint, is redone).
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=200m", str(storage)], check=True)
        else:
            monkeypatch.undo()
        run_worker(config.replace(epochs=2), LocalSession(run, torch.device("cpu"), config.keep_checkpoints))
        assert [(r["epoch"], r["step"]) for r in metrics_rows(storage / "run")] == [
            (1, 3),
            (2, 6),
        ]  # 96 images, 32 a step
        assert json.loads((storage / "run" / "artifacts" / "model.json").read_text())["epochs"] == 2
    finally:
        if mounted:
            # --lazy: a file the failed attempt left open (its TensorBoard writer) keeps the mount busy a while
            subprocess.run(["umount", "--lazy", str(storage)], check=False)
