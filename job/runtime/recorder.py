"""What rank 0 writes: after each epoch its sample grid, metrics line, TensorBoard events and status line;
at the end the model a consumer needs without Ray. It makes no collective call: the loop makes those
(`job.runtime.loop.run_worker`), and hands the end's gathered values in.
"""

from __future__ import annotations

from gan.grid import image_grid_png
from gan.plots import loss_curves_png, quality_curves_png
from gan.sampling import sample
from job.config import TrainConfig
from job.console import warn
from job.runtime.distributed import print0
from job.runtime.state import TrainingState
from job.storage.artifacts import RunArtifacts
from job.storage.location import Location
from job.storage.tensorboard import EpochWriter


class Recorder:
    """Writes `<run>/artifacts/` (rank 0 only); its metrics rows are `metrics.jsonl` as written."""

    def __init__(self, config: TrainConfig, run: Location, data: dict, resumed_epoch: int) -> None:
        self.config = config
        self.data = data  # what model.json says of the data (`job.runtime.loop.data_record`)
        self.artifacts = RunArtifacts(run)
        self.rows: list[dict] = self.artifacts.metrics_through(resumed_epoch)
        self.artifacts.write_metrics(self.rows)  # drops epochs a crash left behind without a checkpoint
        self.tensorboard: EpochWriter | None = None  # opened by the first epoch it logs
        self.tensorboard_from = resumed_epoch + 1  # its purge step: readers drop what was logged there and after

    def forget_after(self, epoch: int) -> None:
        """Drop the rows of epochs after `epoch` (rolled back: they are trained again), here and in TensorBoard."""
        self.rows = [r for r in self.rows if r["epoch"] <= epoch]
        self.artifacts.write_metrics(self.rows)
        self._close_tensorboard()
        self.tensorboard_from = epoch + 1

    def sample_grid(self, state: TrainingState) -> bytes:
        """Draw and store the epoch's grid of fixed-noise samples; returns its PNG bytes."""
        images = sample(state.sampler, state.fixed_noise, state.fixed_labels)  # never the DDP wrapper: rank 0 draws
        png = image_grid_png(images, columns=state.grid_columns)  # conditional: a row per class
        self.artifacts.write_sample_grid(state.epoch, png)
        return png

    def write_epoch(self, row: dict, grid_png: bytes | None) -> None:
        """The epoch's metrics line, then its TensorBoard events. Before the checkpoint is reported: a crash in
        between re-runs the epoch, and the resume drops the line again."""
        self.rows.append(row)
        self.artifacts.write_metrics(self.rows)
        try:
            if self.tensorboard is None:
                self.tensorboard = EpochWriter(self.artifacts.folder, self.tensorboard_from, self.config.to_dict())
            self.tensorboard.log_epoch(row, grid_png)
        except Exception as err:
            self._tensorboard_failed(err)

    def status_line(self, row: dict, stats: dict[str, float], epoch_time_s: float, eta_s: float) -> None:
        """The epoch's one console line; `stats` unrounded, as the row may hold "nan"."""
        quality = row.get("quality")
        print0(
            f"epoch {row['epoch']}/{self.config.epochs}  loss_d {stats['loss_d']:.4f}  loss_g {stats['loss_g']:.4f}  "
            f"D(x) {stats['d_real_prob']:.3f}  D(G(z)) {stats['d_fake_prob']:.3f}  "
            f"{row['images_per_s']:.0f} img/s  {epoch_time_s:.1f}s  ETA {format_duration(eta_s)}"
            + (f"  modes {quality['modes_covered']} fid {quality['fid_classifier']:.2f}" if quality else "")
        )

    def finish(self, state: TrainingState, digests: list[str], nodes: list[str]) -> None:
        """The model a consumer needs without Ray (generator.pt, model.json, plots); `digests` and `nodes` by rank."""
        self.close()
        rows = self.rows
        self.artifacts.write_generator(state.sampler.state_dict())
        self.artifacts.write_json(
            "model.json",
            {
                "config": self.config.to_dict(),
                "data": self.data,
                "epochs": self.config.epochs,
                "step": state.step,
                "final_metrics": rows[-1] if rows else None,
                "param_digests": digests,  # one per rank, equal when DDP kept them in sync
                "nodes": nodes,  # the node of each rank, in rank order
                "conditional": self.config.conditional,  # G takes labels (N,), classes 0..num_classes-1, with noise
                "num_classes": state.num_classes,  # 0 when unconditional
                "generator": {
                    "class": "gan.models.Generator",
                    "kwargs": {"noise_dim": self.config.noise_dim, "num_classes": state.num_classes},
                    "ema": state.ema is not None,
                },
            },
        )
        if rows:
            self.artifacts.write_png("losses.png", loss_curves_png(rows))
        if self.config.eval_every and any("quality" in r for r in rows):
            self.artifacts.write_png("quality.png", quality_curves_png(rows))
        print0(f"done: {self.config.epochs} epochs, {state.step} steps; artifacts in {self.artifacts.folder.uri}")

    def close(self) -> None:
        """Rewrite the metrics with the last epoch's artifacts and report times, and close the TensorBoard writer."""
        self.artifacts.write_metrics(self.rows)
        self._close_tensorboard()

    def _close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except Exception as err:
                self._tensorboard_failed(err)
            self.tensorboard = None

    def _tensorboard_failed(self, err: Exception) -> None:
        # TensorBoard is for looking at: a warning, not a failed run (on S3 the next epoch sends the whole file again).
        warn(f"could not write the TensorBoard events in {self.artifacts.folder.uri} ({type(err).__name__}: {err})")


def format_duration(seconds: float) -> str:
    """`1h02m03s`, or `2m03s` under an hour."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
