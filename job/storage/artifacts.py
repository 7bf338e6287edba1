"""The run's `artifacts/` folder: what a consumer needs without Ray (metrics, pictures, the model)."""

from __future__ import annotations

import io
import json

import torch

from job.storage.location import Location

METRICS_FILE = "metrics.jsonl"


class RunArtifacts:
    """Reads and writes `<run>/artifacts/`; only rank 0 writes."""

    def __init__(self, run: Location) -> None:
        self.folder = run.child("artifacts")
        self.metrics_file = self.folder.child(METRICS_FILE)

    def read_metrics(self) -> list[dict]:
        """The rows of `metrics.jsonl`: empty only when there is none yet (before the first epoch). A read that
        fails raises: the history must never be taken as empty and written back so."""
        try:
            text = self.metrics_file.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace `metrics.jsonl` whole (object stores cannot append, and it stays small)."""
        self.metrics_file.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))

    def metrics_through(self, last_epoch: int) -> list[dict]:
        """The rows of epochs up to `last_epoch`, once each: what a resume keeps."""
        kept: dict[int, dict] = {}
        for row in self.read_metrics():
            if row.get("epoch", 0) <= last_epoch:
                kept[row["epoch"]] = row
        return [kept[epoch] for epoch in sorted(kept)]

    def write_sample_grid(self, epoch: int, png: bytes) -> None:
        self.folder.child("samples", f"epoch_{epoch:03d}.png").write_bytes(png)

    def write_generator(self, state_dict: dict[str, torch.Tensor]) -> None:
        """A plain state dict of CPU tensors: loadable with `weights_only=True`, no Ray needed."""
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
        self.folder.child("generator.pt").write_bytes(buffer.getvalue())

    def write_json(self, name: str, payload: dict) -> None:
        self.folder.child(name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def write_png(self, name: str, png: bytes) -> None:
        self.folder.child(name).write_bytes(png)
