"""TensorBoard event files for a run, rebuilt whole from `metrics.jsonl` after every epoch.

What TensorBoard shows must never have an epoch twice, after a resume or a rollback. Event files
only grow, S3 cannot append, and every tensorboardX writer starts a new file, so logging as we go
would leave the redone epochs of an earlier attempt in an older file. Instead `build_event_file`
turns the run's rows (which the loop already rewrites without the redone epochs), its config and
its sample grids into the bytes of ONE event file, deterministically (wall times come from the
rows, the step of every event is the epoch number), and `write_tensorboard` stores it in
`artifacts/tensorboard/` through `Location.write_bytes`: one PUT on S3, a temporary file renamed
into place on a local folder, so no reader ever sees half a file.

Each rewrite gets a new name, `events.out.tfevents.<generation>.gan-job` (one generation more
than the highest in the folder, so names sort in writing order and are never reused), because a
live TensorBoard never re-reads a file it has started on (seen with TensorBoard 2.21 and its data
server 0.7; tests/test_tensorboard.py drives both loaders through rewrites of this design):
- TensorBoard's data server (`--load_fast`, the default for a local logdir) keeps every file it
  has opened open and reads on where it stopped, and never opens a path it has seen again. A file
  replaced under the same name is the old, unlinked inode to it: the run stays frozen at the
  epochs it first read, for as long as TensorBoard runs.
- The Python loader (S3 logdirs, `--load_fast=false`) keeps a byte offset per file and reopens the
  path at it. A same-name file that grew by one epoch works, but after a resume or a rollback the
  bytes at that offset belong to other records: it keeps the dropped epochs' old values and reads
  on from the wrong place (later epochs mixed with stale ones, or nothing).
A new name is read from its start. The data server opens it, and its reservoir drops every point
of a tag at or after a step it sees again; the Python loader moves on to the next name in order
and drops every point at or after the step of a second `SessionLog.START`, which each file carries
at step 0. So a user sees each epoch once, redone epochs with their new values, within one reload
(5 s by default), with no restart.

The file before is not deleted at once: the Python loader reading it would fail on a missing file
and never move on. It is replaced by a placeholder of the same size that holds no data (records
that readers skip), so that loader finds its end and moves to the new file, and anything that
reads the folder from scratch (tbparse, a new TensorBoard) finds the data once. The last
`KEEP_PLACEHOLDERS` placeholders stay, for a TensorBoard that many writes behind; older ones are
deleted. A crash between the write and the tidying leaves one older whole file, which the next
write turns into a placeholder; until then a new TensorBoard still shows each epoch once (the
purge above), though a file-by-file reader such as tbparse would see that epoch twice.

tensorboardX provides the protobuf classes and the TFRecord crc; it is imported inside the
functions because importing it loads torch and its writer (about 3 s without torch loaded), and
the CLI imports `job.storage` without needing it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from job.storage.location import Location

FOLDER = "tensorboard"  # under the run's artifacts/
FILE_PATTERN = re.compile(r"events\.out\.tfevents\.(\d+)\.gan-job")
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
SAMPLES_TAG = "samples"  # the fixed-noise 4x4 grid of the epoch
CONFIG_TAG = "config"  # the run's configuration, as text at step 0
NOTES_TAG = "notes"  # what happened at an epoch: a resume, a rollback, a guard, a stop
NOTE_FIELDS = ("resumed", "after_rollback", "guard", "stopped")
KEEP_PLACEHOLDERS = 4  # older generations kept as placeholders, for a live TensorBoard that many writes behind
CACHED_RUNS = 4
# The framed records of each run's epochs from the last write (artifacts URI -> key -> bytes):
# tensorboardX's crc32c is pure Python (~0.2 s a MB), and a grid is a read from storage.
_epoch_cache: dict[str, dict[tuple, bytes]] = {}
_placeholders: set[str] = set()  # URIs of event files made placeholders (they never change again)
_cache_lock = threading.Lock()  # the recorder may write from a background thread


def event_file_name(generation: int) -> str:
    """The name of the folder's event file of this generation; names sort by generation."""
    return f"events.out.tfevents.{generation:010d}.gan-job"


def sample_grid_name(epoch: int) -> str:
    """Where the loop puts an epoch's sample grid, relative to artifacts/."""
    return f"samples/epoch_{epoch:03d}.png"


def build_event_file(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any], grids: Mapping[int, bytes]) -> bytes:
    """The bytes of one TensorBoard event file for these metrics rows, config and PNG grids by epoch.

    Deterministic: the same input gives the same bytes. Each epoch appears once (a repeated epoch
    in `rows` keeps its last row, as the loop's rewrite does); an epoch without a grid has no image.
    """
    epochs = _epochs(rows)
    records = _header_records(_start_time(rows), config)
    records += [_epoch_record(row, epoch, wall_time, grids.get(epoch)) for epoch, wall_time, row in epochs]
    return b"".join(records)


def write_tensorboard(artifacts: Location, rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> Location | None:
    """Rebuild the run's event file in `artifacts/tensorboard/` from all rows so far; returns it (None without rows).

    `artifacts` is the run's `artifacts/` folder, `rows` all of `metrics.jsonl`, `config` the run's
    configuration (`TrainConfig.to_dict()`). The sample grids are read from `artifacts/samples/`.
    Writes the next generation's file whole, turns the older ones into placeholders and deletes
    the oldest (see the module docstring). The bytes are those of `build_event_file`.
    """
    if not rows:
        return None  # nothing to show yet (and no time to date a file by); the first row writes one
    epochs = _epochs(rows)
    start = _start_time(rows)
    records = _header_records(start, config)
    # An epoch's record depends only on its row, its wall time and its grid, and a grid is written
    # before its row (a redone epoch has a new row): so the records of rows seen in the last call
    # are reused, not rebuilt, and their grids are not read again (N reads an epoch on S3 otherwise).
    with _cache_lock:
        cached = _epoch_cache.get(artifacts.uri, {})
    fresh = {}
    for epoch, wall_time, row in epochs:
        key = (epoch, wall_time, json.dumps(row, sort_keys=True, default=str))
        record = cached.get(key)
        if record is None:
            record = _epoch_record(row, epoch, wall_time, _read_grid(artifacts, epoch))
        fresh[key] = record
        records.append(record)
    with _cache_lock:
        _epoch_cache.pop(artifacts.uri, None)
        _epoch_cache[artifacts.uri] = fresh
        while len(_epoch_cache) > CACHED_RUNS:  # a process that trains runs one after another
            del _epoch_cache[next(iter(_epoch_cache))]

    folder = artifacts.child(FOLDER)
    older = sorted(name for name in folder.list_names() if FILE_PATTERN.fullmatch(name))
    generation = max((int(FILE_PATTERN.fullmatch(name).group(1)) for name in older), default=0) + 1
    target = folder.child(event_file_name(generation))
    target.write_bytes(b"".join(records))
    # Only now, so that a reader always finds a whole file (module docstring): the older files
    # become placeholders (the one before, and any a crash left whole), and the oldest go.
    for name in older[:-KEEP_PLACEHOLDERS]:
        _ignore_storage_errors(folder.child(name).delete)
    for name in older[-KEEP_PLACEHOLDERS:]:
        _ignore_storage_errors(lambda: _make_placeholder(folder.child(name), start))
    return target


def _make_placeholder(file: Location, wall_time: float) -> None:
    """Replace an older event file by a placeholder of its size, unless it is one already."""
    if file.uri in _placeholders:
        return
    info = file.fs.get_file_info(file.path)
    with file.fs.open_input_file(file.path) as stream:  # its first record's start, not the whole file
        start = stream.read_at(14, 0)
    if info.size and start[12:14] != _varint(PLACEHOLDER_FIELD << 3 | 2):  # a placeholder's first bytes
        file.write_bytes(_placeholder(info.size, wall_time))
    with _cache_lock:
        _placeholders.add(file.uri)


def _ignore_storage_errors(action: Callable[[], object]) -> None:
    try:
        action()
    except OSError:
        pass  # gone already, or a storage hiccup: the next write tidies up again


def _read_grid(artifacts: Location, epoch: int) -> bytes | None:
    try:
        return artifacts.child(sample_grid_name(epoch)).read_bytes()
    except FileNotFoundError:
        return None  # no grid for this epoch (never written, or removed): its scalars still count


def _start_time(rows: Sequence[Mapping[str, Any]]) -> float:
    """When the run's first attempt took its first step: the file's own time (0 without rows)."""
    first = min(rows, key=lambda row: int(row["epoch"]), default={})
    start = _number(first.get("first_step_at"))
    return start if start is not None and math.isfinite(start) else (_wall_times([first])[0] if first else 0.0)


def _epochs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, float, Mapping[str, Any]]]:
    """(epoch, wall time, row) in epoch order, each epoch once (its last row)."""
    by_epoch = {int(row["epoch"]): row for row in rows}
    ordered = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    return [(int(row["epoch"]), wall_time, row) for row, wall_time in zip(ordered, _wall_times(ordered))]


def _header_records(start: float, config: Mapping[str, Any]) -> list[bytes]:
    from tensorboardX.proto import event_pb2  # lazy: see the module docstring

    events = [
        event_pb2.Event(wall_time=start, step=0, file_version="brain.Event:2"),
        # A second START in a run makes TensorBoard's Python loader drop every point at or after
        # its step: how a rewritten file replaces what a live TensorBoard read from the last one.
        event_pb2.Event(wall_time=start, step=0, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)),
        _event(start, 0, [_text(CONFIG_TAG, _config_markdown(config))]),
    ]
    return [_framed(event.SerializeToString()) for event in events]


def _epoch_record(row: Mapping[str, Any], epoch: int, wall_time: float, grid: bytes | None) -> bytes:
    """One event at step `epoch`: the row's numbers, its notes, and the sample grid when there is one."""
    values = [_scalar(tag, value) for tag, value in _row_scalars(row)]
    if notes := _notes(row):
        values.append(_text(NOTES_TAG, notes))
    if grid is not None:
        values.append(_image(SAMPLES_TAG, grid))
    return _framed(_event(wall_time, epoch, values).SerializeToString())


def _wall_times(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """When each epoch ended (Unix time), from the rows alone so the bytes are deterministic.

    An attempt's first row has `first_step_at` (its first step, close to its epoch's start); each
    row adds its epoch and checkpoint time. Rows before any `first_step_at` count from 0.
    """
    times, clock = [], 0.0
    for row in rows:
        if isinstance(row.get("first_step_at"), (int, float)):
            clock = float(row["first_step_at"])
        clock += _number(row.get("epoch_time_s")) or 0.0
        clock += _number(row.get("checkpoint_time_s")) or 0.0
        times.append(round(clock, 3))
    return times


def _number(value: Any) -> float | None:
    """A float for a metric value; the loop writes a non-finite loss as the string "nan" or "inf"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(value)
    return None


def _row_scalars(row: Mapping[str, Any]) -> list[tuple[str, float]]:
    scalars = [(tag, _number(row.get(field))) for field, tag in ROW_SCALARS.items()]
    quality = row.get("quality")
    if isinstance(quality, Mapping):
        scalars += [(f"{QUALITY_SECTION}/{name}", _number(value)) for name, value in sorted(quality.items())]
    return [(tag, value) for tag, value in scalars if value is not None]


def _notes(row: Mapping[str, Any]) -> str:
    return "\n\n".join(f"**{field}**: `{json.dumps(row[field], sort_keys=True)}`" for field in NOTE_FIELDS if row.get(field))


def _config_markdown(config: Mapping[str, Any]) -> str:
    # An indented block: TensorBoard's text plugin renders it as code, one field a line.
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
    return "\n".join("    " + line for line in text.splitlines())


def _event(wall_time: float, step: int, values: list) -> Any:
    from tensorboardX.proto import event_pb2, summary_pb2  # lazy, as all tensorboardX imports here: module docstring

    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=values))


def _scalar(tag: str, value: float) -> Any:
    from tensorboardX.proto import summary_pb2  # lazy: see the module docstring

    # The scalars plugin's own metadata, so TensorBoard files it under Scalars without guessing.
    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    return summary_pb2.Summary.Value(tag=tag, simple_value=value, metadata=metadata)


def _text(tag: str, text: str) -> Any:
    from tensorboardX.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2  # lazy: see the module docstring

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
    )  # fmt: skip
    return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)


def _image(tag: str, png: bytes) -> Any:
    from tensorboardX.proto import summary_pb2  # lazy: see the module docstring

    width, height, channels = _png_size(png)
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
    return summary_pb2.Summary.Value(tag=tag, image=image)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> channels (a palette image shows as RGB)


def _png_size(png: bytes) -> tuple[int, int, int]:
    """(width, height, channels) from the PNG header, which TensorBoard's image summary records."""
    if png[:8] != PNG_SIGNATURE or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height, _, colour_type = struct.unpack(">IIBB", png[16:26])
    return width, height, PNG_CHANNELS.get(colour_type, 3)


PLACEHOLDER_FIELD = 1000  # an Event field number no TensorBoard version uses: readers skip it


def _placeholder(size: int, wall_time: float) -> bytes:
    """`size` bytes of event file that hold no data: Events with only a wall time and an unknown field.

    The size of the file it replaces: TensorBoard's Python loader goes on reading a file from its
    offset, and its S3 reader fails on an offset past the end of an object; at the old size it finds
    the end of the file and moves on to the next. The wall time is the run's (the data server dates
    a run by its earliest event). Records of 64 KiB, all alike, so that the pure-Python crc runs
    once for them. Empty when `size` is too small to hold a record.
    """
    chunk = _padding_record(PLACEHOLDER_CHUNK, wall_time)
    smallest = len(_padding_record(0, wall_time, smallest=True))
    count = max(0, (size - 2 * smallest) // len(chunk))
    rest = size - count * len(chunk)
    # A size where the length's varint grows by a byte has no one record: a smallest one, then the rest.
    tail = _padding_record(rest, wall_time) or _padding_record(0, wall_time, smallest=True) + _padding_record(rest - smallest, wall_time)
    return chunk * count + tail if len(tail) == rest else b""


PLACEHOLDER_CHUNK = 1 << 16


@functools.lru_cache(maxsize=8)
def _padding_record(size: int, wall_time: float, smallest: bool = False) -> bytes:
    """One framed record of exactly `size` bytes (or the smallest one) of a placeholder Event; b"" if none fits."""
    wall = b"\x09" + struct.pack("<d", wall_time)  # Event.wall_time (field 1, a double), after the padding
    key = _varint(PLACEHOLDER_FIELD << 3 | 2)
    room = size - 16 - len(key) - len(wall)  # what the padding's length and bytes may take
    for length_size in range(1, 6):
        zeros = 0 if smallest else room - length_size
        if zeros >= 0 and len(_varint(zeros)) == length_size:
            return _framed(key + _varint(zeros) + bytes(zeros) + wall)
    return b""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _framed(record: bytes) -> bytes:
    """One TFRecord: length, its masked crc32c, the record, its masked crc32c."""
    from tensorboardX.record_writer import masked_crc32c  # lazy: see the module docstring

    header = struct.pack("<Q", len(record))
    return header + struct.pack("<I", masked_crc32c(header)) + record + struct.pack("<I", masked_crc32c(record))
