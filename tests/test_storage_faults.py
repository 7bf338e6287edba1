"""The fault matrix: every read path the job has, against every fault S3 and MinIO produce, played
twice through `tests/faultproxy.py` in front of the loopback S3 server:

- a blip inside the retry budget: the operation succeeds (a resumed run records every epoch once);
- an outage past it: a clean failure (the attempt raises, or the command exits 1 with one line),
  and nothing lost: the run's objects, `metrics.jsonl`, every checkpoint, LATEST and its log, and
  the data cache are as they were.

The retry budget and the request timeout are set low for these tests (GAN_JOB_STORAGE_RETRY_S,
GAN_JOB_STORAGE_TIMEOUT_S) so that an outage costs about two seconds. The paths run in this process:
the worker's resume is `run_worker` with the one-process session, which reads the checkpoint and
the metrics as a Ray Train worker does (`tests/test_faults.py` plays the same through Ray Train).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

from gan.data import IDX_FILES
from job.cli import main
from job.runtime.driver import check as preflight
from job.config import TrainConfig
from job.errors import StorageFailed
from job.runtime.local_session import LocalSession
from job.runtime.loop import run_worker
from job.storage.data_source import bucket_cache_dir, fetch_from_bucket
from job.storage.location import resolve_location
from tests.conftest import parse_jsonl
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.s3

BUDGET_S, TIMEOUT_S = 1.5, 1.0  # the retry budget and one request's read timeout, in these tests
BLIP_S, OUTAGE_S = 0.25, BUDGET_S + TIMEOUT_S + 2.0  # a blip ends before the first retry; an outage outlasts them all
STALL_S = TIMEOUT_S + 0.5  # a stalled request is held past the client's read timeout
STATE_READ = re.compile(r"/checkpoint_[^/?]+/state\.pt($|\?)")


def _is_listing(method: str, target: str) -> bool:
    return method == "GET" and ("list-type=2" in target or "prefix=" in target)


# fault name: (what a failed request meets, which requests fail: every one of the path's, its listings,
# or its state.pt reads)
FAULTS = {
    "reset": ("reset", "all"),
    "503 SlowDown": ("slowdown", "all"),
    "500 InternalError": ("internal", "all"),
    "stall": ("stall", "all"),
    "listing fails": ("slowdown", "list"),
    "state.pt reads fail": ("reset", "state"),
}
# path: the faults that reach it (promote reads LATEST with GETs and lists nothing; the data has no state.pt)
PATHS = {
    "resume in a worker": list(FAULTS),
    "driver's preflight": list(FAULTS),
    "generate --from": list(FAULTS),
    "evaluate": list(FAULTS),
    "promote's reads of LATEST": ["reset", "503 SlowDown", "500 InternalError", "stall"],
    "data from the bucket": ["reset", "503 SlowDown", "500 InternalError", "stall", "listing fails"],
}
CASES = [
    (path, fault, duration) for path, faults in PATHS.items() for fault in faults for duration in ("blip", "outage")
]


def _proxy(s3_url: str, token: str, fault: str, duration: str) -> FaultProxy:
    """A proxy whose outage starts at the first request of the path (those that name `token`) that the fault hits."""
    kind, scope = FAULTS[fault]

    def hits(method: str, target: str) -> bool:
        target = unquote(target)
        if token not in target:
            return False
        if scope == "list":
            return _is_listing(method, target)
        if scope == "state":
            return method in ("GET", "HEAD") and bool(STATE_READ.search(target))
        return True

    upstream = int(s3_url.rsplit(":", 1)[1])
    return FaultProxy(
        upstream, hits, outage_s=BLIP_S if duration == "blip" else OUTAGE_S, fault=kind, affects=hits, stall_s=STALL_S
    )


@pytest.fixture(scope="module")
def stored_run(s3_service, small_fashion_dir):
    """A finished one-epoch run in the bucket, trained once for the module (no proxy): the paths read it."""
    name = f"base-{uuid.uuid4().hex[:6]}"
    config = TrainConfig(
        data="fashion-mnist", data_dir=str(small_fashion_dir), epochs=1, batch_size=32, limit=64, cpus_per_worker=1,
        eval_every=0, storage=f"s3://{s3_service.bucket}/faults", run_name=name,
    )  # fmt: skip
    with s3_service.environment():
        run_worker(
            config,
            LocalSession(resolve_location(config.storage).child(name), torch.device("cpu"), config.keep_checkpoints),
        )
    return config


@pytest.fixture(scope="module")
def bucket_data(s3_service, small_fashion_dir):
    """The small data set's four IDX files in the bucket, under a prefix of their own."""
    prefix = f"faults-data-{uuid.uuid4().hex[:6]}"
    s3_service.upload(small_fashion_dir, prefix)
    return f"s3://{s3_service.bucket}/{prefix}", prefix


@pytest.fixture(scope="module")
def promoted_job(s3_service, stored_run, small_fashion_dir, trained_classifier_file, tmp_path_factory):
    """A job prefix whose LATEST points at the stored run, with its log: each promote case starts from a copy."""
    prefix = f"job-{uuid.uuid4().hex[:6]}"
    source, relative = trained_classifier_file
    cache = tmp_path_factory.mktemp("promote-cache")
    (cache / relative).parent.mkdir(parents=True)
    (cache / relative).write_bytes(source.read_bytes())
    argv = ["promote", "--run", f"{stored_run.storage}/{stored_run.run_name}",
            "--target", f"s3://{s3_service.bucket}/{prefix}/LATEST",
            "--data-dir", str(small_fashion_dir), "--num", "16"]  # fmt: skip
    with s3_service.environment(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        assert main(argv) == 0
    return prefix


@pytest.fixture
def low_bounds(s3_server, monkeypatch):
    monkeypatch.setenv("GAN_JOB_STORAGE_RETRY_S", str(BUDGET_S))
    monkeypatch.setenv("GAN_JOB_STORAGE_TIMEOUT_S", str(TIMEOUT_S))
    return s3_server


def _copy_run(s3, source: str, target: str) -> None:
    client = s3.client()
    for key in s3.keys(f"{source}/"):
        client.copy_object(
            Bucket=s3.bucket, Key=target + key[len(source) :], CopySource={"Bucket": s3.bucket, "Key": key}
        )


def _one_line_exit_1(code: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 1, err
    assert lines[-1].startswith("gan-job: error: ") and "nothing was changed" in lines[-1], err
    assert "failed after" in lines[-1] and "Traceback" not in err, err


@pytest.mark.parametrize("path, fault, duration", CASES, ids=[f"{p}-{f}-{d}" for p, f, d in CASES])
def test_fault_matrix(
    path,
    fault,
    duration,
    stored_run,
    bucket_data,
    promoted_job,
    low_bounds,
    cached_classifier,
    small_fashion_dir,
    tmp_path,
    monkeypatch,
    capsys,
):
    s3 = low_bounds
    storage_prefix = stored_run.storage.split("/", 3)[3]
    run_uri = f"{stored_run.storage}/{stored_run.run_name}"
    token = stored_run.run_name
    if path == "resume in a worker":  # it writes: a copy of its own
        token = f"resume-{uuid.uuid4().hex[:6]}"
        _copy_run(s3, f"{storage_prefix}/{stored_run.run_name}", f"{storage_prefix}/{token}")
    elif path == "promote's reads of LATEST":
        token = f"job-{uuid.uuid4().hex[:6]}"
        _copy_run(s3, promoted_job, token)  # a LATEST to read, and its log
    elif path == "data from the bucket":
        token = bucket_data[1]
    before = s3.objects(f"{storage_prefix}/{token}/" if path == "resume in a worker" else f"{token}/") if path in (
        "resume in a worker", "promote's reads of LATEST") else None  # fmt: skip
    capsys.readouterr()

    proxy = _proxy(s3.url, token, fault, duration)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        outcome = _play(path, token, stored_run, run_uri, bucket_data[0], small_fashion_dir, tmp_path)
    finally:
        proxy.close()
    captured = capsys.readouterr()
    assert proxy.dropped, f"the fault never hit {path}"  # it was played

    if path == "resume in a worker":
        rows = parse_jsonl(s3.read(f"{storage_prefix}/{token}/artifacts/metrics.jsonl"))
        if duration == "blip":
            assert outcome is None
            assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2), (2, 4)]  # each epoch once, resumed at 2
        else:
            assert isinstance(outcome, StorageFailed) and "failed after" in str(outcome)
            assert s3.objects(f"{storage_prefix}/{token}/") == before  # every checkpoint and metrics.jsonl as they were
    elif path == "driver's preflight":
        if duration == "blip":
            assert outcome is not None and outcome.uri == run_uri
        else:
            assert isinstance(outcome, StorageFailed) and "failed after" in str(outcome)
    elif path in ("generate --from", "evaluate"):
        if duration == "blip":
            assert outcome == 0, captured.err
        else:
            _one_line_exit_1(outcome, captured.err)
            assert not (tmp_path / "grid.png").exists()
    elif path == "promote's reads of LATEST":
        log = parse_jsonl(s3.read(f"{token}/promotions.jsonl"))
        if duration == "blip":
            assert outcome == 0, captured.err
            assert len(log) == 2 and all(entry["promoted"] for entry in log)  # the second decision made, and logged
        else:
            _one_line_exit_1(outcome, captured.err)
            assert s3.objects(f"{token}/") == before  # LATEST and the log as they were
    elif path == "data from the bucket":
        cache = bucket_cache_dir(bucket_data[0])
        if duration == "blip":
            assert isinstance(outcome, Path) and sorted(p.name for p in outcome.iterdir()) == sorted(
                f"{stem}.gz" for stem in IDX_FILES.values()
            )
        else:
            assert isinstance(outcome, StorageFailed)
            assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")], list(
                cache.iterdir()
            )


def _play(path: str, token: str, stored_run: TrainConfig, run_uri: str, data_uri: str, data_dir: Path, tmp_path: Path):
    """Run one path; its return value, or the storage error it raised."""
    try:
        if path == "resume in a worker":
            config = stored_run.replace(run_name=token, epochs=2)
            run = resolve_location(config.storage).child(token)
            return run_worker(config, LocalSession(run, torch.device("cpu"), keep_checkpoints=3))
        if path == "driver's preflight":
            return preflight(stored_run).run
        if path == "generate --from":
            return main(["generate", "--from", run_uri, "--num", "4", "--out", str(tmp_path / "grid.png")])
        if path == "evaluate":
            return main(["evaluate", "--from", run_uri, "--data-dir", str(data_dir), "--num", "16"])
        if path == "promote's reads of LATEST":
            target = f"s3://{run_uri.split('/')[2]}/{token}/LATEST"
            return main(["promote", "--run", run_uri, "--target", target, "--data-dir", str(data_dir), "--num", "16"])
        if path == "data from the bucket":
            return fetch_from_bucket(data_uri)
    except StorageFailed as err:
        return err
    raise AssertionError(path)
