"""TensorBoard's view of a run: rank 0 logs each epoch's events as it records the epoch into
`artifacts/tensorboard/`, with one writer per attempt opened at `purge_step`, so each epoch shows once.

Why: docs/architecture.md#tensorboard-event-files
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from job.storage.location import Location

FOLDER = "tensorboard"  # under the run's artifacts/
# Per-epoch numbers from a metrics row, as `<section>/<field>` tags: TensorBoard groups a section.
ROW_SCALARS = {
    "loss_d": "train/loss_d",
    "loss_g": "train/loss_g",
    "d_real_prob": "train/d_real_prob",
    "d_fake_prob": "train/d_fake_prob",
    "images_per_s": "speed/images_per_s",
    "epoch_time_s": "speed/epoch_time_s",
}
QUALITY_SECTION = "quality"  # every numeric entry of the row's `quality` dict, as quality/<name>
SAMPLES_TAG = "samples"  # the epoch's fixed-noise sample grid
CONFIG_TAG = "config"  # the run's configuration, as text at each writer's first epoch
NOTES_TAG = "notes"  # what happened at an epoch: a resume, a rollback, a guard, a stop
NOTE_FIELDS = ("resumed", "after_rollback", "guard", "stopped")


class EpochWriter:
    """The events of one attempt (or of what follows a rollback), from `first_epoch` on."""

    def __init__(self, artifacts: Location, first_epoch: int, config: Mapping[str, Any]) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self.folder = artifacts.child(FOLDER)
        logdir = Path(self.folder.path) if self.folder.is_local else Path(tempfile.mkdtemp(prefix="gan-tensorboard-"))
        logdir.mkdir(parents=True, exist_ok=True)
        self.staging = None if self.folder.is_local else logdir  # a bucket's file is written here, then sent whole
        self.writer = EventsWriter(str(logdir / "events"), f".{time.time_ns()}.gan-job")  # writes the file version
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self.writer.write_event(event_pb2.Event(wall_time=time.time(), step=first_epoch, session_log=start))
        self._write(first_epoch, [_text(CONFIG_TAG, _config_markdown(config))])

    def log_epoch(self, row: Mapping[str, Any], grid_png: bytes | None) -> None:
        """The row's numbers, its notes and the epoch's grid, at step = the epoch; then flushed (and uploaded)."""
        from tensorboardX.proto import summary_pb2
        from tensorboardX.summary import scalar

        values = [scalar(tag, value).value[0] for tag, value in _row_scalars(row)]
        if notes := _notes(row):
            values.append(_text(NOTES_TAG, notes))
        if grid_png is not None:  # the PNG as it is, not decoded and encoded again
            width, height = int.from_bytes(grid_png[16:20], "big"), int.from_bytes(grid_png[20:24], "big")
            image = summary_pb2.Summary.Image(height=height, width=width, colorspace=1, encoded_image_string=grid_png)
            values.append(summary_pb2.Summary.Value(tag=SAMPLES_TAG, image=image))
        self._write(int(row["epoch"]), values)
        if self.staging is not None:
            (events,) = self.staging.iterdir()  # one writer, one file
            self.folder.child(events.name).write_bytes(events.read_bytes())

    def _write(self, step: int, values: list) -> None:
        """One event of summary `values` at `step`, in the file when this returns."""
        from tensorboardX.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=values)
        self.writer.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def _number(value: Any) -> float | None:
    """A float for a metric value; the loop writes a non-finite loss as the string "nan" or "inf"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _row_scalars(row: Mapping[str, Any]) -> list[tuple[str, float]]:
    scalars = [(tag, _number(row.get(field))) for field, tag in ROW_SCALARS.items()]
    quality = row.get("quality")
    if isinstance(quality, Mapping):
        scalars += [(f"{QUALITY_SECTION}/{name}", _number(value)) for name, value in sorted(quality.items())]
    return [(tag, value) for tag, value in scalars if value is not None]


def _notes(row: Mapping[str, Any]) -> str:
    noted = [field for field in NOTE_FIELDS if row.get(field)]
    return "\n\n".join(f"**{field}**: `{json.dumps(row[field], sort_keys=True)}`" for field in noted)


def _text(tag: str, text: str) -> Any:
    from tensorboardX.summary import text as text_summary

    value = text_summary(tag, text).value[0]
    value.tag = tag  # not tensorboardX's `<tag>/text_summary`
    return value


def _config_markdown(config: Mapping[str, Any]) -> str:
    # An indented block: TensorBoard's text plugin renders it as code, one field a line.
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
    return "\n".join("    " + line for line in text.splitlines())
