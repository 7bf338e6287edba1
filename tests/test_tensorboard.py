"""TensorBoard event files rebuilt from the metrics rows: read back as TensorBoard reads them.

Three readers: tbparse (the folder loaded from scratch, file by file), TensorBoard's own Python
loader (`EventMultiplexer`, reloaded after each write as a live TensorBoard reloads) and, where its
binary is installed, TensorBoard's data server (`--load_fast`, the default for a local logdir).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import job.runtime.quality
import job.runtime.recorder
from job.storage import tensorboard
from job.storage.location import resolve_location
from job.storage.tensorboard import build_event_file, write_tensorboard
from tests.conftest import metrics_rows, train_one_process

ROW_TAGS = {"train/loss_d", "train/loss_g", "train/d_real_prob", "train/d_fake_prob", "speed/images_per_s", "speed/epoch_time_s"}
PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d4944415478da63f8cfc0f01f0005000201a5f1e1a50000000049454e44ae426082"
)  # one RGBA pixel


def row(epoch: int, loss: float, **extra) -> dict:
    """A metrics row as the loop writes it (`extra` adds or replaces fields)."""
    return {
        "epoch": epoch, "step": 3 * epoch, "loss_d": loss, "loss_g": loss + 1, "d_real_prob": 0.6, "d_fake_prob": 0.4,
        "images_per_s": 100.0 + epoch, "epoch_time_s": 2.0, "world_size": 1, **extra,
    }  # fmt: skip


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as tbparse reads the folder (every event file, from scratch)."""
    from tbparse import SummaryReader

    frame = SummaryReader(str(logdir), pivot=False).scalars
    found: dict[str, list[tuple[int, float]]] = {}
    for tag, step, value in zip(frame["tag"], frame["step"], frame["value"]):
        found.setdefault(tag, []).append((int(step), float(value)))
    return {tag: sorted(points) for tag, points in found.items()}


def texts(logdir: Path) -> dict[str, list[tuple[int, str]]]:
    from tbparse import SummaryReader

    frame = SummaryReader(str(logdir), pivot=False).text
    found: dict[str, list[tuple[int, str]]] = {}
    for tag, step, value in zip(frame["tag"], frame["step"], frame["value"]):
        found.setdefault(tag, []).append((int(step), value))
    return {tag: sorted(entries) for tag, entries in found.items()}


def image_steps(logdir: Path) -> dict[str, list[int]]:
    """tag -> steps of the image summaries (tbparse skips images without TensorFlow)."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    steps: dict[str, list[int]] = {}
    for path in sorted(logdir.iterdir()):
        accumulator = EventAccumulator(str(path), size_guidance={IMAGES: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()[IMAGES]:
            steps.setdefault(tag, []).extend(image.step for image in accumulator.Images(tag))
    return {tag: sorted(s) for tag, s in steps.items()}


def holds_data(path: Path) -> bool:
    """Whether an event file has any summary or session event (a placeholder has none)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return any(e.HasField("summary") or e.HasField("session_log") for e in EventFileLoader(str(path)).Load())


class LiveTensorBoard:
    """TensorBoard's Python loader on one logdir, kept between reloads as a running TensorBoard keeps it."""

    def __init__(self, logdir: str, multifile: bool = False) -> None:
        from tensorboard.backend.event_processing import plugin_event_multiplexer

        self.logdir = logdir
        # multifile: --reload_multifile=true; otherwise the default, which follows the newest file only.
        self.mux = plugin_event_multiplexer.EventMultiplexer(event_file_active_filter=(lambda _: True) if multifile else None)

    def reload(self) -> dict[str, list[tuple[int, float]]]:
        """tag -> [(step, value)] of the scalars it holds now."""
        from tensorboard.util import tensor_util

        self.mux.AddRunsFromDirectory(self.logdir)
        self.mux.Reload()
        runs = self.mux.Runs()
        if not runs:
            return {}
        accumulator = self.mux.GetAccumulator(next(iter(runs)))
        return {
            tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"]
            if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
        }


def points(rows: list[dict], field: str) -> list[tuple[int, float]]:
    return [(r["epoch"], pytest.approx(float(r[field]), rel=1e-6)) for r in rows]


# The resume of the brief: epochs 1-2, then the rows rewritten to epoch 1 (a resume from its
# checkpoint), then epochs 2-3 trained again with other values.
RESUME = [
    [row(1, 1.0, first_step_at=1000.0), row(2, 2.0)],
    [row(1, 1.0, first_step_at=1000.0)],
    [row(1, 1.0, first_step_at=1000.0), row(2, 20.0, first_step_at=2000.0, resumed={"from_epoch": 1})],
    [row(1, 1.0, first_step_at=1000.0), row(2, 20.0, first_step_at=2000.0, resumed={"from_epoch": 1}), row(3, 30.0)],
]


def test_one_event_file_from_hand_made_rows_holds_each_epoch_once(tmp_path):
    rows = [
        row(1, 1.5, first_step_at=1_700_000_000.0, first_step_s=3.0, checkpoint_time_s=0.5),
        row(2, 1.2, loss_g="nan", quality={"fid_classifier": 12.5, "modes_covered": 7, "class_histogram": [0.5, 0.5]},
            guard={"guard": "divergence", "cause": "non-finite loss", "action": "warn"}),
        row(3, 0.9),
    ]  # fmt: skip
    config = {"epochs": 3, "lr": 0.0001, "run_name": "hand"}
    data = build_event_file(rows, config, {1: PNG_1x1, 3: PNG_1x1})
    assert data == build_event_file(rows, config, {1: PNG_1x1, 3: PNG_1x1})  # deterministic
    (tmp_path / "events.out.tfevents.1.test").write_bytes(data)

    found = scalars(tmp_path)
    assert set(found) == ROW_TAGS | {"quality/fid_classifier", "quality/modes_covered"}
    assert all([step for step, _ in found[tag]] == [1, 2, 3] for tag in ROW_TAGS)
    assert found["quality/fid_classifier"] == [(2, 12.5)] and found["quality/modes_covered"] == [(2, 7.0)]
    assert found["train/loss_d"] == [(1, 1.5), (2, pytest.approx(1.2)), (3, pytest.approx(0.9))]
    assert math.isnan(found["train/loss_g"][1][1])  # the loop's "nan" for a non-finite loss shows, as NaN
    assert image_steps(tmp_path) == {"samples": [1, 3]}
    text = texts(tmp_path)
    assert [step for step, _ in text["config"]] == [0] and json.loads(text["config"][0][1]) == config
    assert [step for step, _ in text["notes"]] == [2] and "non-finite loss" in text["notes"][0][1]

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = list(EventFileLoader(str(tmp_path / "events.out.tfevents.1.test")).Load())
    by_step = {e.step: e.wall_time for e in events if e.HasField("summary") and e.step}
    # Wall times from the rows: the attempt's first step, plus each epoch's and checkpoint's time.
    assert by_step == {1: 1_700_000_002.5, 2: 1_700_000_004.5, 3: 1_700_000_006.5}


def test_a_resume_leaves_each_epoch_once_with_the_final_values_for_every_reader(tmp_path):
    artifacts = resolve_location(str(tmp_path / "run" / "artifacts"))
    logdir = tmp_path / "run" / "artifacts" / "tensorboard"
    live = LiveTensorBoard(str(logdir))
    live_multifile = LiveTensorBoard(str(logdir), multifile=True)
    for rows in RESUME:
        write_tensorboard(artifacts, rows, {"epochs": 3})
        assert live.reload()["train/loss_d"] == points(rows, "loss_d")
        assert live_multifile.reload()["train/loss_d"] == points(rows, "loss_d")

    final = RESUME[-1]
    found = scalars(logdir)  # a reader that starts now
    assert set(found) == ROW_TAGS
    for tag, field in (("train/loss_d", "loss_d"), ("train/loss_g", "loss_g"), ("speed/images_per_s", "images_per_s")):
        assert found[tag] == points(final, field)
    notes = texts(logdir)["notes"]
    assert [step for step, _ in notes] == [2] and "from_epoch" in notes[0][1]
    files = sorted(logdir.iterdir())
    assert [f.name for f in files] == [tensorboard.event_file_name(g) for g in (1, 2, 3, 4)]
    assert [holds_data(f) for f in files] == [False, False, False, True]  # older names kept as placeholders
    assert all(f.stat().st_size > 0 for f in files)  # of their old size, for a live reader's offset


def test_old_event_files_beyond_the_kept_few_are_deleted(tmp_path):
    artifacts = resolve_location(str(tmp_path / "artifacts"))
    rows = []
    for epoch in range(1, tensorboard.KEEP_PLACEHOLDERS + 4):
        rows.append(row(epoch, 1.0 / epoch, first_step_at=1000.0) if epoch == 1 else row(epoch, 1.0 / epoch))
        written = write_tensorboard(artifacts, rows, {})
    names = sorted(p.name for p in (tmp_path / "artifacts" / "tensorboard").iterdir())
    assert len(names) == tensorboard.KEEP_PLACEHOLDERS + 1 and names[-1] == Path(written.path).name
    found = scalars(tmp_path / "artifacts" / "tensorboard")
    assert [step for step, _ in found["train/loss_g"]] == list(range(1, tensorboard.KEEP_PLACEHOLDERS + 4))


def test_a_whole_older_file_left_by_a_crash_becomes_a_placeholder_and_no_rows_write_nothing(tmp_path):
    artifacts = resolve_location(str(tmp_path / "artifacts"))
    logdir = tmp_path / "artifacts" / "tensorboard"
    assert write_tensorboard(artifacts, [], {}) is None and not logdir.exists()
    logdir.mkdir(parents=True)
    left = logdir / tensorboard.event_file_name(7)  # a crash came between writing it and tidying the one before
    left.write_bytes(build_event_file(RESUME[0], {}, {}))
    (logdir / tensorboard.event_file_name(6)).write_bytes(build_event_file(RESUME[0], {}, {}))
    written = write_tensorboard(artifacts, RESUME[-1], {})
    assert Path(written.path).name == tensorboard.event_file_name(8)
    assert [holds_data(f) for f in sorted(logdir.iterdir())] == [False, False, True]
    assert scalars(logdir)["train/loss_d"] == points(RESUME[-1], "loss_d")


def data_server_binary() -> Path | None:
    """TensorBoard's data server (the tensorboard-data-server package), where it is installed."""
    try:
        import tensorboard_data_server
    except ImportError:
        return None
    path = Path(tensorboard_data_server.__file__).parent / "bin" / "server"
    return path if path.exists() else None


DATA_SERVER = data_server_binary()


@pytest.mark.skipif(DATA_SERVER is None, reason="TensorBoard's data server (tensorboard-data-server) is not installed")
def test_a_live_data_server_follows_the_rewrites(tmp_path):
    """TensorBoard's default loader for a local logdir (Rust, `--load_fast`) sees each rewrite."""
    import grpc
    from tensorboard import context
    from tensorboard.data import grpc_provider
    from tensorboard.data.proto import data_provider_pb2_grpc

    artifacts = resolve_location(str(tmp_path / "run" / "artifacts"))
    logdir = tmp_path / "run" / "artifacts" / "tensorboard"
    logdir.mkdir(parents=True)
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [str(DATA_SERVER), "--logdir", str(logdir), "--port", "0", "--port-file", str(port_file), "--reload", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and server.poll() is None, "the data server did not start"
            time.sleep(0.05)
        address = f"localhost:{port_file.read_text().strip()}"
        stub = data_provider_pb2_grpc.TensorBoardDataProviderStub(grpc.insecure_channel(address))
        provider = grpc_provider.GrpcDataProvider(address, stub)

        def shown() -> list[tuple[int, float]]:
            found = provider.read_scalars(context.RequestContext(), experiment_id="", plugin_name="scalars", downsample=100)
            return [(d.step, d.value) for run in found.values() for d in run.get("train/loss_d", [])]

        for rows in RESUME:
            write_tensorboard(artifacts, rows, {"epochs": 3})
            deadline = time.monotonic() + 20
            while shown() != points(rows, "loss_d"):
                assert time.monotonic() < deadline, f"the data server shows {shown()} for rows {[r['epoch'] for r in rows]}"
                time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def tensorboard_after_each_metrics_write(monkeypatch):
    """A live TensorBoard (Python loader) reloaded after each rewrite of the event file by the recorder
    (after every metrics.jsonl write: each epoch, a resume, a rollback). Returns that TensorBoard's views."""
    views: list[dict] = []

    def write_and_reload(artifacts, rows, config):
        written = write_tensorboard(artifacts, rows, config)
        logdir = artifacts.child("tensorboard").path
        if not views or views[-1]["logdir"] != logdir:
            views.append({"logdir": logdir, "live": LiveTensorBoard(logdir)})
        views[-1]["shown"] = views[-1]["live"].reload()
        return written

    monkeypatch.setattr(job.runtime.recorder, "write_tensorboard", write_and_reload)
    return views


def test_a_real_run_resumed_after_losing_its_last_checkpoint_shows_each_epoch_once(
    tmp_path, tiny_data_dir, tensorboard_after_each_metrics_write
):
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "real", epochs=3, checkpoint_every=1)
    before = metrics_rows(run)
    newest = sorted(run.glob("checkpoint_*"))[-1]
    shutil.rmtree(newest)  # as if the run died after epoch 3's metrics line, before its checkpoint was stored
    train_one_process(tmp_path / "runs", tiny_data_dir, "real", epochs=3, checkpoint_every=1)
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and "resumed" in rows[2] and rows[2]["first_step_at"] > before[0]["first_step_at"]

    logdir = run / "artifacts" / "tensorboard"
    found = scalars(logdir)
    assert set(found) == ROW_TAGS
    for tag, field in (("train/loss_d", "loss_d"), ("train/d_fake_prob", "d_fake_prob"), ("speed/epoch_time_s", "epoch_time_s")):
        assert found[tag] == points(rows, field)
    assert image_steps(logdir) == {"samples": [1, 2, 3]}
    assert tensorboard_after_each_metrics_write[-1]["shown"]["train/loss_d"] == points(rows, "loss_d")  # the live one too


def test_a_real_rollback_shows_the_redone_epoch_once_with_quality(
    tmp_path, tiny_data_dir, monkeypatch, tensorboard_after_each_metrics_write
):
    """The collapse guard rolls epochs 3-4 back to epoch 2's checkpoint: epoch 3 is recorded, then dropped, then redone."""

    modes = iter([9, 9, 2, 1, 1, 1, 1, 1])

    def planted(self, generator):
        covered = next(modes)
        return {"modes_covered": covered, "fid_classifier": 10.0 * (10 - covered), "fid_classifier_floor": 1.0}

    monkeypatch.setattr(job.runtime.quality.QualityProbe, "evaluate", planted)
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "rolled", epochs=5, eval_every=1, on_collapse="rollback")
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["after_rollback"]["resumed_from_epoch"] == 2

    logdir = run / "artifacts" / "tensorboard"
    found = scalars(logdir)
    assert set(found) == ROW_TAGS | {"quality/modes_covered", "quality/fid_classifier", "quality/fid_classifier_floor"}
    assert found["quality/modes_covered"] == points([{"epoch": r["epoch"], "m": r["quality"]["modes_covered"]} for r in rows], "m")
    assert found["train/loss_g"] == points(rows, "loss_g")
    notes = texts(logdir)["notes"]
    assert [step for step, _ in notes] == [3] and "resumed_from_epoch" in notes[0][1]  # the rollback, at the epoch after it
    assert tensorboard_after_each_metrics_write[-1]["shown"]["quality/modes_covered"] == found["quality/modes_covered"]


def test_a_real_run_with_training_time_quality_writes_every_numeric_quality_entry(tmp_path, tiny_data_dir):
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "q", epochs=2, eval_every=1, eval_num=100)
    rows = metrics_rows(run)
    found = scalars(run / "artifacts" / "tensorboard")
    numeric = {name for name, value in rows[0]["quality"].items() if isinstance(value, (int, float))}
    assert numeric and {tag for tag in found if tag.startswith("quality/")} == {f"quality/{name}" for name in numeric}
    assert all([step for step, _ in found[f"quality/{name}"]] == [1, 2] for name in numeric)


def test_a_plain_run_leaves_event_files_with_every_epoch_once_and_its_config(tmp_path, tiny_data_dir):
    """No patch: the recorder itself rewrites artifacts/tensorboard/ after each epoch."""
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "plain", epochs=3)
    rows, logdir = metrics_rows(run), run / "artifacts" / "tensorboard"
    found = scalars(logdir)
    assert set(found) == ROW_TAGS
    for tag, field in (("train/loss_d", "loss_d"), ("train/loss_g", "loss_g"), ("speed/images_per_s", "images_per_s")):
        assert found[tag] == points(rows, field)
    assert image_steps(logdir) == {"samples": [1, 2, 3]}
    ((step, config),) = texts(logdir)["config"]
    assert step == 0 and '"run_name": "plain"' in config
    assert sum(holds_data(path) for path in logdir.iterdir()) == 1  # one whole file; the older ones are placeholders


def test_a_failed_tensorboard_write_is_one_warning_and_training_goes_on(tmp_path, tiny_data_dir, monkeypatch, capsys):
    def fail(artifacts, rows, config):
        if rows:  # as the real one, which writes nothing without rows (the run's start)
            raise OSError("disk full")

    monkeypatch.setattr(job.runtime.recorder, "write_tensorboard", fail)
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "failing", epochs=2)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard" in line]
    assert len(warnings) == 2 and all(line.startswith("warning: ") and "disk full" in line for line in warnings)
    assert [r["epoch"] for r in metrics_rows(run)] == [1, 2] and (run / "artifacts" / "generator.pt").exists()


@pytest.mark.s3
def test_a_resume_in_a_bucket_leaves_one_whole_file_and_tensorboard_reads_it_from_s3(s3_server, tmp_path, monkeypatch):
    prefix = "tensorboard-test/run/artifacts"
    artifacts = resolve_location(f"s3://{s3_server.bucket}/{prefix}")
    for epoch in (1, 2, 3):
        artifacts.child(tensorboard.sample_grid_name(epoch)).write_bytes(PNG_1x1)
    # TensorBoard's own S3 reader (boto3) takes its endpoint from S3_ENDPOINT, not AWS_ENDPOINT_URL.
    monkeypatch.setenv("S3_ENDPOINT", s3_server.url)
    live = LiveTensorBoard(f"s3://{s3_server.bucket}/{prefix}/tensorboard")
    for rows in RESUME:
        write_tensorboard(artifacts, rows, {"epochs": 3})
        assert live.reload()["train/loss_d"] == points(rows, "loss_d")

    keys = s3_server.keys(f"{prefix}/tensorboard/")
    assert keys == [f"{prefix}/tensorboard/{tensorboard.event_file_name(g)}" for g in (1, 2, 3, 4)]
    download = tmp_path / "tensorboard"
    download.mkdir()
    for key in keys:
        (download / key.rsplit("/", 1)[1]).write_bytes(s3_server.read(key))
    found = scalars(download)
    assert found["train/loss_d"] == points(RESUME[-1], "loss_d") and found["train/loss_g"] == points(RESUME[-1], "loss_g")
    assert image_steps(download) == {"samples": [1, 2, 3]}
