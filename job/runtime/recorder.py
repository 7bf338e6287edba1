"""What a run leaves behind: after each epoch its sample grid, checkpoint (when due), metrics line,
TensorBoard event file and status line; at the end the model a consumer needs without Ray. Rank 0
writes; every rank calls each method, since checkpoints and the end gather values from all ranks.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from gan.data import ImageSet
from gan.plots import image_grid_png, loss_curves_png, quality_curves_png
from gan.sampling import sample
from job.config import TrainConfig
from job.console import warn
from job.runtime.distributed import gather_objects, print0
from job.runtime.state import TrainingState
from job.storage.artifacts import RunArtifacts
from job.storage.checkpoint import write_checkpoint
from job.storage.location import Location
from job.storage.tensorboard import write_tensorboard

Report = Callable[[dict, Path | None], None]  # WorkerSession.report: hands over metrics and a checkpoint folder


class Recorder:
    """Writes `<run>/artifacts/` and hands checkpoints to the session, in an order that survives a crash."""

    def __init__(self, config: TrainConfig, run: Location, rank: int, report: Report, train_set: ImageSet, resumed_epoch: int) -> None:
        self.config = config
        self.rank = rank
        self.report = report
        self.data = {"name": config.data, "fingerprint": train_set.fingerprint, "num_images": int(train_set.images.shape[0])}
        self.artifacts = RunArtifacts(run)
        self.rows: list[dict] = self.artifacts.metrics_through(resumed_epoch) if rank == 0 else []
        if rank == 0:
            self.artifacts.write_metrics(self.rows)  # drops epochs a crash left behind without a checkpoint
            self.rewrite_tensorboard(self.rows)

    def forget_after(self, epoch: int) -> None:
        """Drop the rows of epochs after `epoch` (rolled back: they are trained again)."""
        self.rows = [r for r in self.rows if r["epoch"] <= epoch]
        if self.rank == 0:
            self.artifacts.write_metrics(self.rows)
            self.rewrite_tensorboard(self.rows)

    def record_epoch(self, state: TrainingState, row: dict, checkpoint_due: bool) -> None:
        """Sample grid, checkpoint when due, metrics line, then the session's report (which takes the checkpoint)."""
        checkpoint = state.checkpoint() if checkpoint_due else None  # every rank: it gathers their RNG states
        checkpoint_dir = None
        try:
            if self.rank == 0:
                images = sample(state.sampler, state.fixed_noise, state.fixed_labels)  # never the DDP wrapper: only rank 0 draws
                grid = image_grid_png(images, title=f"epoch {state.epoch}", columns=state.grid_columns)  # conditional: a row per class
                self.artifacts.write_sample_grid(state.epoch, grid)
                if checkpoint is not None:
                    checkpoint_start_s = time.perf_counter()
                    checkpoint_dir = Path(tempfile.mkdtemp(prefix="gan-ckpt-"))
                    write_checkpoint(checkpoint_dir, checkpoint)
                    # What training waits for: the upload to storage goes on in the background.
                    row["checkpoint_time_s"] = round(time.perf_counter() - checkpoint_start_s, 3)
            # The metrics line goes in before the checkpoint: a crash in between re-runs the epoch,
            # and the resume drops the line again.
            self.rows.append(row)
            self.epoch_recorded(self.rows)
        except BaseException:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise
        self.report(row, checkpoint_dir)  # takes the folder over

    def epoch_recorded(self, rows: list[dict]) -> None:
        """Called once per recorded epoch with every row so far: the one place for their sinks (metrics.jsonl, TensorBoard)."""
        if self.rank == 0:
            self.artifacts.write_metrics(rows)
            self.rewrite_tensorboard(rows)  # after the grid and metrics.jsonl, which it is rebuilt from

    def rewrite_tensorboard(self, rows: list[dict]) -> None:
        """Rebuild `artifacts/tensorboard/` from every row so far (rank 0); a failure is a warning, not a failed run."""
        try:
            write_tensorboard(self.artifacts.folder, rows, self.config.to_dict())
        except Exception as err:  # the next epoch rewrites the whole file
            warn(f"could not write the TensorBoard event file in {self.artifacts.folder.uri} ({type(err).__name__}: {err})")

    def status_line(self, row: dict, stats: dict[str, float], epoch_time_s: float, eta_s: float) -> None:
        """The epoch's one console line (rank 0); `stats` unrounded, as the row may hold "nan"."""
        quality = row.get("quality")
        print0(
            f"epoch {row['epoch']}/{self.config.epochs}  loss_d {stats['loss_d']:.4f}  loss_g {stats['loss_g']:.4f}  "
            f"D(x) {stats['d_real_prob']:.3f}  D(G(z)) {stats['d_fake_prob']:.3f}  "
            f"{row['images_per_s']:.0f} img/s  {epoch_time_s:.1f}s  ETA {format_duration(eta_s)}"
            + (f"  modes {quality['modes_covered']} fid {quality['fid_classifier']:.2f}" if quality else "")
        )

    def finish(self, state: TrainingState, node_id: str) -> None:
        """The model a consumer needs without Ray (generator.pt, model.json, plots), and proof that the ranks agree."""
        digests = gather_objects(state.parameter_digest())
        nodes = gather_objects(node_id)
        if self.rank != 0:
            return
        rows = self.artifacts.read_metrics() or self.rows
        self.artifacts.write_generator(state.sampler.state_dict())
        self.artifacts.write_json("model.json", {
            "config": self.config.to_dict(),
            "data": self.data,
            "epochs": self.config.epochs,
            "step": state.step,
            "final_metrics": rows[-1] if rows else None,
            "param_digests": digests,  # one per rank, equal when DDP kept them in sync
            "nodes": nodes,  # the node of each rank, in rank order
            "conditional": self.config.conditional,  # G takes labels (N,) of classes 0..num_classes-1 with its noise
            "num_classes": state.num_classes,  # 0 when unconditional
            "generator": {
                "class": "gan.models.Generator", "kwargs": {"noise_dim": self.config.noise_dim, "num_classes": state.num_classes},
                "ema": state.ema is not None,
            },
        })  # fmt: skip
        if rows:
            self.artifacts.write_png("losses.png", loss_curves_png(rows))
        if self.config.eval_every and any("quality" in r for r in rows):
            self.artifacts.write_png("quality.png", quality_curves_png(rows))
        print0(f"done: {self.config.epochs} epochs, {state.step} steps; artifacts in {self.artifacts.folder.uri}")


def format_duration(seconds: float) -> str:
    """`1h02m03s`, or `2m03s` under an hour."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
