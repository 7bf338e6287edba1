"""Checkpoints are untrusted input, no secret reaches any output, and the dependencies are bounded.

- A real run's checkpoints, in a bucket, replaced by pickle payloads (plain pickle and
  `torch.save`'s zip format, each with a matching digest so that only `weights_only=True` stands
  in the way): `generate --from` and a `train` resume refuse them and never run them.
- A planted fake secret, with credentials that are refused and with ones that work: it appears in
  no stdout or stderr, no object, no local file and no Ray log.
- Every `torch.load` in the package is `weights_only=True`; nothing else unpickles.
- Every dependency has a lower bound (the audit itself needs the network: docs/operations.md).
"""

from __future__ import annotations

import ast
import hashlib
import io
import pickle
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from job.storage.checkpoint import DIGEST_FILE, STATE_FILE, checkpoint_folders, read_checkpoint
from job.cli import main
from job.storage.location import resolve_location
from tests.conftest import job_env
from tests.faultproxy import files_containing, ray_session_dir, ray_worker_log_lines, tree_state

pytestmark = pytest.mark.s3
REPO = Path(__file__).resolve().parents[1]


# Payloads -------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it writes "executed" into `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('executed')",))


def plain_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def torch_zip(marker: Path) -> bytes:
    """`torch.save`'s zip format, shaped like a real checkpoint, with the payload where G's weights go."""
    buffer = io.BytesIO()
    torch.save({"format_version": 1, "generator": Payload(marker), "epoch": 3, "config": {"noise_dim": 100}}, buffer)
    return buffer.getvalue()


PAYLOADS = {"plain pickle": plain_pickle, "torch.save zip": torch_zip}


@pytest.mark.parametrize("kind", PAYLOADS)
def test_each_payload_runs_its_code_when_loaded_without_weights_only(kind, tmp_path):
    """The control: these bytes are hostile, so refusing them below proves something."""
    marker = tmp_path / "executed"
    raw = PAYLOADS[kind](marker)
    pickle.loads(raw) if kind == "plain pickle" else torch.load(io.BytesIO(raw), weights_only=False)
    assert marker.read_text() == "executed"


# A real run in the bucket -----------------------------------------------------------------------


@dataclass
class S3Run:
    storage: str  # s3://bucket/security
    name: str
    prefix: str  # key prefix of the run
    argv: list[str]
    output: str  # the driver's stdout and stderr, worker lines included


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3_service, fashion_mnist_dir) -> S3Run:
    """A real run in the bucket, driven as a user does (`python -m job train`, joined to the cluster).

    One worker, 512 images, batch 256: 2 steps an epoch; 3 epochs, every checkpoint kept.
    """
    name = f"sec-{uuid.uuid4().hex[:6]}"
    storage = f"s3://{s3_service.bucket}/security"
    argv = [
        "train", "--data", "fashion-mnist", "--data-dir", str(fashion_mnist_dir), "--limit", "512", "--epochs", "3",
        "--keep-checkpoints", "3", "--cpus-per-worker", "1", "--storage", storage, "--run-name", name,
        "--eval-every", "0",
    ]  # fmt: skip
    env = job_env(s3=s3_service, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    done = subprocess.run([sys.executable, "-m", "job", *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return S3Run(storage, name, f"security/{name}", argv, done.stdout + done.stderr)


def _copy_run(s3_server, run: S3Run, new_name: str) -> str:
    """Copy every object of `run` to a run named `new_name` (Ray's snapshot names folders relatively)."""
    client = s3_server.client()
    new_prefix = f"security/{new_name}"
    for key in s3_server.keys(run.prefix + "/"):
        client.copy_object(
            Bucket=s3_server.bucket,
            Key=new_prefix + key[len(run.prefix) :],
            CopySource={"Bucket": s3_server.bucket, "Key": key},
        )
    return new_prefix


def _checkpoint_prefixes(s3_server, prefix: str) -> list[str]:
    """The run's checkpoint folders as key prefixes, newest first."""
    run = resolve_location(f"s3://{s3_server.bucket}/{prefix}", s3_server.url)
    return [folder.path.split("/", 1)[1] for folder in checkpoint_folders(run)]


def _plant(s3_server, checkpoint_prefix: str, payload: bytes) -> None:
    """Replace a checkpoint's state with `payload`, and its digest with the payload's own."""
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key=f"{checkpoint_prefix}/{STATE_FILE}", Body=payload)
    digest = f"{hashlib.sha256(payload).hexdigest()}  {STATE_FILE}\n".encode()
    client.put_object(Bucket=s3_server.bucket, Key=f"{checkpoint_prefix}/{DIGEST_FILE}", Body=digest)


@pytest.mark.ray
@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("target", ["run folder", "checkpoint folder"])
def test_generate_refuses_a_payload_in_a_real_checkpoint_and_never_runs_it(
    s3_server, s3_run, kind, target, tmp_path, capsys
):
    prefix = _copy_run(s3_server, s3_run, f"gen-{uuid.uuid4().hex[:6]}")
    marker = tmp_path / "executed"
    checkpoints = _checkpoint_prefixes(s3_server, prefix)
    assert len(checkpoints) == 3
    for checkpoint in checkpoints:
        _plant(s3_server, checkpoint, PAYLOADS[kind](marker))
    source = f"s3://{s3_server.bucket}/{prefix if target == 'run folder' else checkpoints[0]}"
    out = tmp_path / "grid.png"
    assert main(["generate", "--from", source, "--num", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot be loaded safely" in err.strip().splitlines()[-1]
    assert checkpoints[0].rsplit("/", 1)[1] in err  # the refused checkpoint is named
    assert not marker.exists() and not out.exists()


@pytest.mark.ray
@pytest.mark.parametrize("kind", PAYLOADS)
def test_train_refuses_to_resume_from_payloads_and_never_runs_them(s3_server, s3_run, kind, tmp_path, capsys):
    name = f"resume-{uuid.uuid4().hex[:6]}"
    prefix = _copy_run(s3_server, s3_run, name)
    marker = tmp_path / "executed"
    for checkpoint in _checkpoint_prefixes(s3_server, prefix):
        _plant(s3_server, checkpoint, PAYLOADS[kind](marker))
    before = s3_server.objects(prefix + "/")
    argv = [*s3_run.argv[: s3_run.argv.index("--run-name")], "--run-name", name, "--epochs", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no checkpoint loads safely" in err.strip().splitlines()[-1]
    assert not marker.exists()
    assert s3_server.objects(prefix + "/") == before  # refused before anything was written


@pytest.mark.ray
def test_train_workers_refuse_payload_checkpoints_from_ray_and_resume_from_the_good_one(s3_server, s3_run, tmp_path):
    """Ray hands the workers its latest checkpoint (a payload); they refuse it and fall back past another."""
    name = f"fallback-{uuid.uuid4().hex[:6]}"
    prefix = _copy_run(s3_server, s3_run, name)
    marker = tmp_path / "executed"  # the workers run on this machine: they would write it here
    newest, middle, _ = _checkpoint_prefixes(s3_server, prefix)  # the oldest (epoch 1) stays good
    _plant(s3_server, newest, plain_pickle(marker))
    _plant(s3_server, middle, torch_zip(marker))
    argv = [*s3_run.argv[: s3_run.argv.index("--run-name")], "--run-name", name, "--epochs", "4"]
    assert main(argv) == 0
    assert not marker.exists()
    assert [line for line in ray_worker_log_lines("latest checkpoint unusable") if newest.rsplit("/", 1)[1] in line]
    assert ray_worker_log_lines(f"resuming run {name} at epoch 2 (step 2)")
    rows = s3_server.metrics_rows(prefix)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4] and [row["step"] for row in rows] == [2, 4, 6, 8]
    newest_now = _checkpoint_prefixes(s3_server, prefix)[0]
    assert read_checkpoint(resolve_location(f"s3://{s3_server.bucket}/{newest_now}", s3_server.url))["epoch"] == 4


# Secrets ----------------------------------------------------------------------------------------


def _assert_nowhere(needles: list[str], texts: list[str], objects: dict[str, bytes], roots: list[Path]) -> None:
    for needle in needles:
        assert not any(needle in text for text in texts), "a secret is in the output"
        assert not [key for key, body in objects.items() if needle.encode() in body], "a secret is in an object"
    assert not files_containing(roots, [needle.encode() for needle in needles])


def test_a_planted_secret_appears_nowhere_when_the_credentials_are_refused(
    s3_server, tiny_data_dir, tmp_path, monkeypatch, capfd
):
    planted = f"planted-FAKE-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", planted)
    before = tree_state(tmp_path)
    storage = f"s3://{s3_server.bucket}/refused"
    attempts = {
        "train": ["train", "--data-dir", str(tiny_data_dir), "--storage", storage, "--run-name", "r"],
        "generate": ["generate", "--from", f"s3://{s3_server.bucket}/security", "--out", str(tmp_path / "grid.png")],
        "data push": ["data", "push", "--data", "mnist", "--data-dir", str(tiny_data_dir), "--to", storage],
    }
    outputs = []
    for command, argv in attempts.items():
        assert main(argv) == 2, command
        captured = capfd.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, (command, lines)
        assert re.search(r"credentials|cannot be read", lines[0]), (command, lines[0])
        outputs += [captured.out, captured.err]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    assert tree_state(tmp_path) == before  # nothing written locally
    assert not s3_server.keys("refused/")
    import ray

    _assert_nowhere(
        [planted], outputs, s3_server.objects(), [tmp_path, *([ray_session_dir()] if ray.is_initialized() else [])]
    )


@pytest.mark.ray
def test_the_secret_of_a_run_that_succeeds_appears_nowhere(s3_server, s3_run, tmp_path_factory):
    """After real runs with the session's credentials: the driver's output, every object, the
    files the tests wrote, and every file of the Ray session (logs of the driver, workers, raylet, GCS)."""
    assert f"run {s3_run.name} finished" in s3_run.output
    roots = [tmp_path_factory.getbasetemp(), ray_session_dir()]
    _assert_nowhere([s3_server.secret_key], [s3_run.output], s3_server.objects(), roots)
    assert s3_server.access_key not in s3_run.output  # an identifier, not a secret, but it has no business in logs


# Code and dependencies ------------------------------------------------------------------------


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "attr", None) == name or getattr(node.func, "id", None) == name)
    ]


def test_every_torch_load_in_the_package_is_weights_only_and_nothing_else_unpickles():
    sources = {
        path: ast.parse(path.read_text()) for folder in ("gan", "job") for path in sorted((REPO / folder).rglob("*.py"))
    }
    loads = []
    for path, tree in sources.items():
        for call in _calls(tree, "load") + _calls(tree, "loads"):
            module = ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else ""
            assert module not in ("pickle", "cPickle", "dill", "cloudpickle", "joblib"), f"{path}: {ast.unparse(call)}"
            if module == "torch":
                loads.append(path.relative_to(REPO).as_posix())
                weights_only = {kw.arg: kw.value for kw in call.keywords}.get("weights_only")
                assert isinstance(weights_only, ast.Constant) and weights_only.value is True, (
                    f"{path}: {ast.unparse(call)}"
                )
            if module in ("np", "numpy"):
                allow = {kw.arg: kw.value for kw in call.keywords}.get("allow_pickle")
                assert allow is None or (isinstance(allow, ast.Constant) and allow.value is False), (
                    f"{path}: {ast.unparse(call)}"
                )
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                assert not {"pickle", "dill", "cloudpickle"} & set(names), f"{path} imports an unpickler"
    assert "job/storage/checkpoint.py" in loads  # the checkpoint reader is found: the scan reaches the subpackages


def test_every_dependency_declares_a_lower_bound():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *[r for extra in project.get("optional-dependencies", {}).values() for r in extra],
    ]
    unbounded = [
        r
        for r in requirements
        if not any(spec.operator in (">=", "==", "~=", ">") for spec in Requirement(r).specifier)
    ]
    assert not unbounded, f"no lower bound: {unbounded}"
