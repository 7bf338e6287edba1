"""TensorBoard events logged as each epoch is recorded, one writer per attempt: read back as TensorBoard reads them.

Three readers: tbparse (the folder loaded from scratch, file by file), TensorBoard's own Python
loader (`EventMultiplexer`, reloaded after each epoch as a live TensorBoard reloads) and, where its
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
from job.storage.location import Location, resolve_location
from job.storage.tensorboard import EpochWriter
from tests.conftest import metrics_rows, train_one_process

ROW_TAGS = {
    "train/loss_d", "train/loss_g", "train/d_real_prob", "train/d_fake_prob",
    "speed/images_per_s", "speed/epoch_time_s",
}
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


class LiveTensorBoard:
    """TensorBoard's Python loader on one logdir, kept between reloads as a running TensorBoard keeps it."""

    def __init__(self, logdir: str, multifile: bool = False) -> None:
        from tensorboard.backend.event_processing import plugin_event_multiplexer

        self.logdir = logdir
        # multifile: --reload_multifile=true; otherwise the default, which follows the newest file only.
        active = (lambda _: True) if multifile else None
        self.mux = plugin_event_multiplexer.EventMultiplexer(event_file_active_filter=active)

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


# A resume: epochs 1-2 logged by the first attempt, whose checkpoint of epoch 2 was lost, then epochs
# 2-3 trained again with other values by a second attempt that resumed from epoch 1.
ATTEMPTS = [
    (1, [row(1, 1.0), row(2, 2.0)]),
    (2, [row(2, 20.0, resumed={"from_epoch": 1}), row(3, 30.0)]),
]
FINAL = [row(1, 1.0), row(2, 20.0), row(3, 30.0)]


def log_attempts(artifacts: Location, after_each=None) -> list[list[dict]]:
    """Log ATTEMPTS as the recorder does, one writer each; calls `after_each(rows so far)` after every epoch."""
    shown: list[dict] = []
    for first_epoch, rows in ATTEMPTS:
        writer = EpochWriter(artifacts, first_epoch, {"epochs": 3})
        shown = [r for r in shown if r["epoch"] < first_epoch]
        for r in rows:
            writer.log_epoch(r, PNG_1x1)
            shown.append(r)
            if after_each:
                after_each(list(shown))
        writer.close()
    return shown


def test_one_writer_logs_each_epoch_with_its_numbers_notes_grid_and_config(tmp_path):
    rows = [
        row(1, 1.5, first_step_s=3.0, checkpoint_time_s=0.5),
        row(2, 1.2, loss_g="nan", quality={"fid_classifier": 12.5, "modes_covered": 7, "class_histogram": [0.5, 0.5]},
            guard={"guard": "divergence", "cause": "non-finite loss", "action": "warn"}),
        row(3, 0.9),
    ]  # fmt: skip
    config = {"epochs": 3, "lr": 0.0001, "run_name": "hand"}
    writer = EpochWriter(resolve_location(str(tmp_path)), 1, config)
    for r in rows:
        writer.log_epoch(r, PNG_1x1 if r["epoch"] != 2 else None)
    writer.close()
    logdir = tmp_path / "tensorboard"

    found = scalars(logdir)
    assert set(found) == ROW_TAGS | {"quality/fid_classifier", "quality/modes_covered"}
    assert all([step for step, _ in found[tag]] == [1, 2, 3] for tag in ROW_TAGS)
    assert found["quality/fid_classifier"] == [(2, 12.5)] and found["quality/modes_covered"] == [(2, 7.0)]
    assert found["train/loss_d"] == [(1, 1.5), (2, pytest.approx(1.2)), (3, pytest.approx(0.9))]
    assert math.isnan(found["train/loss_g"][1][1])  # the loop's "nan" for a non-finite loss shows, as NaN
    assert image_steps(logdir) == {"samples": [1, 3]}
    text = texts(logdir)
    assert [step for step, _ in text["config"]] == [1] and json.loads(text["config"][0][1]) == config
    assert [step for step, _ in text["notes"]] == [2] and "non-finite loss" in text["notes"][0][1]


def test_a_resume_shows_each_epoch_once_with_the_final_values_in_a_live_and_a_new_tensorboard(tmp_path):
    artifacts = resolve_location(str(tmp_path / "run" / "artifacts"))
    logdir = tmp_path / "run" / "artifacts" / "tensorboard"
    live = LiveTensorBoard(str(logdir))
    live_multifile = LiveTensorBoard(str(logdir), multifile=True)

    def reload(shown):
        assert live.reload()["train/loss_d"] == points(shown, "loss_d")
        assert live_multifile.reload()["train/loss_d"] == points(shown, "loss_d")

    log_attempts(artifacts, reload)
    assert LiveTensorBoard(str(logdir)).reload()["train/loss_g"] == points(FINAL, "loss_g")  # one started now

    # One file per attempt, in the order they were opened; tbparse reads each whole (it knows no purge):
    # the second starts at its purge step, 2, with the new values.
    first, second = sorted(logdir.iterdir())
    assert [step for step, _ in scalars_of(first)["train/loss_d"]] == [1, 2]
    assert scalars_of(second)["train/loss_d"] == points(FINAL[1:], "loss_d")
    assert image_steps(logdir) == {"samples": [1, 2, 2, 3]}


def scalars_of(event_file: Path) -> dict[str, list[tuple[int, float]]]:
    """tbparse's scalars of one event file."""
    folder = event_file.parent.parent / f"only-{event_file.name}"
    folder.mkdir()
    shutil.copy(event_file, folder)
    return scalars(folder)


def test_writers_opened_in_the_same_second_never_share_a_file(tmp_path):
    artifacts = resolve_location(str(tmp_path))
    for first_epoch in (1, 1, 1):
        writer = EpochWriter(artifacts, first_epoch, {})
        writer.log_epoch(row(1, 1.0), None)
        writer.close()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 3


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
def test_a_live_data_server_follows_a_resume(tmp_path):
    """TensorBoard's default loader for a local logdir (Rust, `--load_fast`) shows each epoch once, live."""
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
            found = provider.read_scalars(
                context.RequestContext(), experiment_id="", plugin_name="scalars", downsample=100
            )
            return [(d.step, d.value) for run in found.values() for d in run.get("train/loss_d", [])]

        def wait_for(rows):
            deadline = time.monotonic() + 20
            while shown() != points(rows, "loss_d"):
                epochs = [r["epoch"] for r in rows]
                assert time.monotonic() < deadline, f"the data server shows {shown()} for rows {epochs}"
                time.sleep(0.1)

        log_attempts(artifacts, wait_for)
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def tensorboard_after_each_epoch(monkeypatch):
    """A live TensorBoard (Python loader) reloaded after each epoch the recorder logs. Returns its views."""
    views: list[dict] = []
    log_epoch = EpochWriter.log_epoch

    def log_and_reload(self, row, grid_png):
        log_epoch(self, row, grid_png)
        logdir = self.folder.path
        if not views or views[-1]["logdir"] != logdir:
            views.append({"logdir": logdir, "live": LiveTensorBoard(logdir)})
        views[-1]["shown"] = views[-1]["live"].reload()

    monkeypatch.setattr(EpochWriter, "log_epoch", log_and_reload)
    return views


def test_a_real_run_resumed_after_losing_its_last_checkpoint_shows_each_epoch_once(
    tmp_path, tiny_data_dir, tensorboard_after_each_epoch
):
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "real", epochs=3, checkpoint_every=1)
    before = metrics_rows(run)
    newest = sorted(run.glob("checkpoint_*"))[-1]
    shutil.rmtree(newest)  # as if the run died after epoch 3's metrics line, before its checkpoint was stored
    train_one_process(tmp_path / "runs", tiny_data_dir, "real", epochs=3, checkpoint_every=1)
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and "resumed" in rows[2]
    assert rows[2]["first_step_at"] > before[0]["first_step_at"]

    logdir = run / "artifacts" / "tensorboard"
    shown = LiveTensorBoard(str(logdir)).reload()  # a TensorBoard started now
    for tag in ("train/loss_d", "train/d_fake_prob", "speed/epoch_time_s"):
        field = tag.split("/")[1]
        assert shown[tag] == points(rows, field)
    assert tensorboard_after_each_epoch[-1]["shown"]["train/loss_d"] == points(rows, "loss_d")  # the live one too
    assert set(scalars(logdir)) == ROW_TAGS
    assert image_steps(logdir) == {"samples": [1, 2, 3, 3]}  # epoch 3 in both files: a file-by-file reader


def test_a_real_rollback_shows_the_redone_epoch_once_with_quality(
    tmp_path, tiny_data_dir, monkeypatch, tensorboard_after_each_epoch
):
    """The collapse guard rolls epochs 3-4 back to epoch 2's checkpoint: epoch 3 recorded, then dropped, then redone."""

    modes = iter([9, 9, 2, 1, 1, 1, 1, 1])

    def planted(self, generator):
        covered = next(modes)
        return {"modes_covered": covered, "fid_classifier": 10.0 * (10 - covered), "fid_classifier_floor": 1.0}

    monkeypatch.setattr(job.runtime.quality.QualityProbe, "evaluate", planted)
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "rolled", epochs=5, eval_every=1, on_collapse="rollback")
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["after_rollback"]["resumed_from_epoch"] == 2

    logdir = run / "artifacts" / "tensorboard"
    shown = LiveTensorBoard(str(logdir)).reload()
    assert set(shown) == ROW_TAGS | {"quality/modes_covered", "quality/fid_classifier", "quality/fid_classifier_floor"}
    covered = [{"epoch": r["epoch"], "m": r["quality"]["modes_covered"]} for r in rows]
    assert shown["quality/modes_covered"] == points(covered, "m")
    assert shown["train/loss_g"] == points(rows, "loss_g")
    assert tensorboard_after_each_epoch[-1]["shown"]["quality/modes_covered"] == shown["quality/modes_covered"]
    after_rollback = sorted(logdir.iterdir())[-1]  # the writer opened by the rollback, from epoch 3
    notes = texts(after_rollback.parent)["notes"]
    assert [step for step, _ in notes] == [3] and "resumed_from_epoch" in notes[0][1]
    assert [step for step, _ in scalars_of(after_rollback)["train/loss_g"]] == [3, 4, 5]


def test_a_real_run_with_training_time_quality_logs_every_numeric_quality_entry(tmp_path, tiny_data_dir):
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "q", epochs=2, eval_every=1, eval_num=100)
    rows = metrics_rows(run)
    found = scalars(run / "artifacts" / "tensorboard")
    numeric = {name for name, value in rows[0]["quality"].items() if isinstance(value, (int, float))}
    assert numeric and {tag for tag in found if tag.startswith("quality/")} == {f"quality/{name}" for name in numeric}
    assert all([step for step, _ in found[f"quality/{name}"]] == [1, 2] for name in numeric)


def test_a_plain_run_leaves_one_event_file_with_every_epoch_once_and_its_config(tmp_path, tiny_data_dir):
    """No patch: the recorder itself logs each epoch to artifacts/tensorboard/."""
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "plain", epochs=3)
    rows, logdir = metrics_rows(run), run / "artifacts" / "tensorboard"
    found = scalars(logdir)
    assert set(found) == ROW_TAGS
    for tag, field in (("train/loss_d", "loss_d"), ("train/loss_g", "loss_g"), ("speed/images_per_s", "images_per_s")):
        assert found[tag] == points(rows, field)
    assert image_steps(logdir) == {"samples": [1, 2, 3]}
    ((step, config),) = texts(logdir)["config"]
    assert step == 1 and '"run_name": "plain"' in config
    assert len(list(logdir.iterdir())) == 1


def test_a_failed_tensorboard_write_is_one_warning_and_training_goes_on(tmp_path, tiny_data_dir, monkeypatch, capsys):
    def fail(self, row, grid_png):
        raise OSError("disk full")

    monkeypatch.setattr(EpochWriter, "log_epoch", fail)
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "failing", epochs=2)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard" in line]
    assert len(warnings) == 2 and all(line.startswith("warning: ") and "disk full" in line for line in warnings)
    assert [r["epoch"] for r in metrics_rows(run)] == [1, 2] and (run / "artifacts" / "generator.pt").exists()


@pytest.mark.s3
def test_a_resume_in_a_bucket_puts_each_attempts_file_whole_once_an_epoch_and_tensorboard_reads_it(
    s3_server, tmp_path, monkeypatch
):
    prefix = "tensorboard-test/run/artifacts"
    artifacts = resolve_location(f"s3://{s3_server.bucket}/{prefix}")
    puts: list[tuple[str, int]] = []
    write_bytes = Location.write_bytes

    def counted(self, data):
        puts.append((self.path.rsplit("/", 1)[1], len(data)))
        write_bytes(self, data)

    monkeypatch.setattr(Location, "write_bytes", counted)
    # TensorBoard's own S3 reader (boto3) takes its endpoint from S3_ENDPOINT, not AWS_ENDPOINT_URL.
    monkeypatch.setenv("S3_ENDPOINT", s3_server.url)
    live = LiveTensorBoard(f"s3://{s3_server.bucket}/{prefix}/tensorboard")

    def reload(shown):
        assert live.reload()["train/loss_d"] == points(shown, "loss_d")

    log_attempts(artifacts, reload)

    keys = s3_server.keys(f"{prefix}/tensorboard/")
    assert len(keys) == 2 and len(puts) == 4  # one object per attempt, one PUT per epoch
    assert [name for name, _ in puts] == [keys[0].rsplit("/", 1)[1]] * 2 + [keys[1].rsplit("/", 1)[1]] * 2
    assert puts[1][1] > puts[0][1]  # the whole file each time, grown by the epoch
    download = tmp_path / "tensorboard"
    download.mkdir()
    for key in keys:
        (download / key.rsplit("/", 1)[1]).write_bytes(s3_server.read(key))
    assert LiveTensorBoard(str(download)).reload()["train/loss_g"] == points(FINAL, "loss_g")
    assert image_steps(download) == {"samples": [1, 2, 2, 3]}
