"""The per-worker training loop. Ray-free: a `WorkerSession` supplies rank, device and storage.

Under Ray Train the session is `job.runtime.ray_session.RaySession`; in one process (the GPU epoch check,
fast tests) it is `job.runtime.local_session.LocalSession`. The loop is the same either way.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from gan.data import iterate_batches, load_split, shard_indices
from gan.models import Discriminator, Generator
from gan.plots import image_grid_png, loss_curves_png, quality_curves_png
from gan.step import GeneratorEMA, amp_dtype_for, make_optimizer, train_step
from job.storage.artifacts import RunArtifacts
from job.storage.checkpoint import FORMAT_VERSION, write_checkpoint
from job.config import SHAPE_FIELDS, TrainConfig
from job.console import say
from job.storage.data_source import local_data_folder
from job.runtime.distributed import broadcast_object, gather_objects, mean_across_ranks, parameter_digest, unwrap, wrap_ddp
from job.errors import UsageError
from job.runtime.guards import MAX_ROLLBACKS, CollapseGuard, DivergenceGuard, Verdict
from job.runtime.quality import QualityProbe
from job.storage.location import Location

NUM_SAMPLES = 16  # the tutorial's 4x4 grid of fixed-noise samples
PROGRESS_EVERY_S = 15.0  # live step progress at most this often, so `ray job logs` stays readable
STAT_NAMES = ("loss_d", "loss_g", "d_real_prob", "d_fake_prob")


class WorkerSession(Protocol):
    """What the loop needs from whoever runs it (Ray Train, or one plain process)."""

    rank: int
    world_size: int
    device: torch.device
    run: Location  # `<storage>/<run-name>`
    node_id: str  # the Ray node this rank runs on ("local" in one process)

    def load_checkpoint(self) -> dict | None:
        """The state to resume from, or None for a fresh run."""

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Hand over the epoch's metrics and (rank 0, when due) a checkpoint folder; all ranks call it.

        The session owns the folder from then on and removes it once the checkpoint is stored.
        """


def print0(session: WorkerSession, message: str) -> None:
    if session.rank == 0:
        say(message)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def check_resumable(config: TrainConfig, state: dict) -> None:
    """Refuse a checkpoint whose shapes this configuration cannot load, naming the fields."""
    stored = state["config"]
    differing = [f for f in SHAPE_FIELDS if stored.get(f) != getattr(config, f)]
    if differing:
        details = ", ".join(f"--{f.replace('_', '-')} {stored.get(f)} (run) vs {getattr(config, f)} (now)" for f in differing)
        raise UsageError(f"run {config.run_name!r} cannot resume with this configuration: {details}; use the run's values or a new --run-name")


@dataclass
class Networks:
    """G, D, their optimizers, G's EMA and the training position: what a checkpoint holds."""

    generator: nn.Module  # DDP-wrapped where there is more than one rank
    discriminator: nn.Module
    optimizer_g: torch.optim.Optimizer
    optimizer_d: torch.optim.Optimizer
    ema: GeneratorEMA | None
    fixed_noise: torch.Tensor  # the sample grid's noise, the same for the whole run
    epoch: int = 0  # last finished epoch
    step: int = 0  # optimizer steps so far

    @property
    def sampler(self) -> nn.Module:
        """The generator that makes samples and the final model: the EMA where there is one."""
        return self.ema.module if self.ema else unwrap(self.generator)

    def training_state(self) -> dict:
        state = {
            "generator": unwrap(self.generator).state_dict(),
            "discriminator": unwrap(self.discriminator).state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(),
            "optimizer_d": self.optimizer_d.state_dict(),
            "fixed_noise": self.fixed_noise,
            "epoch": self.epoch,
            "step": self.step,
        }
        if self.ema:
            state["ema_generator"] = self.ema.module.state_dict()
            state["ema_updates"] = self.ema.updates
        return state

    def load_training_state(self, state: dict) -> None:
        unwrap(self.generator).load_state_dict(state["generator"])
        unwrap(self.discriminator).load_state_dict(state["discriminator"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        if self.ema:  # a run that turns the EMA on later starts it from the current G
            self.ema.module.load_state_dict(state.get("ema_generator") or state["generator"])
            self.ema.updates = int(state.get("ema_updates", 0))
        self.fixed_noise = state["fixed_noise"]
        self.epoch, self.step = state["epoch"], state["step"]

    def snapshot(self) -> dict:
        """A private copy of the training state, for a rollback without reading storage."""
        return copy.deepcopy(self.training_state())


def build_networks(config: TrainConfig, device: torch.device) -> Networks:
    # channels_last: the convolution layout oneDNN and cuDNN run fastest (measured with `bench`).
    generator = Generator(config.noise_dim).to(device, memory_format=torch.channels_last)
    discriminator = Discriminator().to(device, memory_format=torch.channels_last)
    return Networks(
        generator=generator,
        discriminator=discriminator,
        optimizer_g=make_optimizer(generator, config.lr, config.beta1),
        optimizer_d=make_optimizer(discriminator, config.lr, config.beta1),
        ema=GeneratorEMA(generator, config.ema_decay) if config.ema_decay > 0 else None,
        fixed_noise=torch.randn(NUM_SAMPLES, config.noise_dim, generator=torch.Generator().manual_seed(config.seed)),
    )


def run_worker(config: TrainConfig, session: WorkerSession) -> None:
    """Train from the latest checkpoint (or from scratch) to `config.epochs`."""
    started_s = time.perf_counter()
    device = session.device
    if config.cpus_per_worker:
        torch.set_num_threads(config.cpus_per_worker)  # Ray leaves one thread per worker otherwise
    torch.manual_seed(config.seed + session.rank)  # each rank draws its own noise and dropout masks

    # Load the data once, as uint8 on the device; batches are cut from it there.
    train_set = load_split(local_data_folder(config), "train", config.limit)
    images_u8 = train_set.images.to(device)

    # Build the networks; restore them when resuming.
    nets = build_networks(config, device)
    amp_dtype = amp_dtype_for(config.precision, device)
    state = session.load_checkpoint()
    resumed: dict | None = None  # where this attempt took over, recorded in its first metrics row
    if state is not None:
        check_resumable(config, state)
        nets.load_training_state(state)
        restore_rng(state["rng"], session, config, nets.epoch + 1)
        if state["data_fingerprint"] != train_set.fingerprint:
            print0(session, f"warning: run {config.run_name} was trained on other data ({state['data_fingerprint']}); continuing on {train_set.fingerprint}")
        print0(session, f"resuming run {config.run_name} at epoch {nets.epoch + 1} (step {nets.step}) on {session.world_size} worker(s)")
        resumed = {"from_epoch": nets.epoch, "from_step": nets.step, "world_size_before": state["rng"].get("world_size")}
    nets.generator = wrap_ddp(nets.generator, device)
    nets.discriminator = wrap_ddp(nets.discriminator, device)
    last_good = nets.snapshot()  # what a rollback returns to: the latest checkpointed state

    artifacts = RunArtifacts(session.run)
    rows = artifacts.metrics_through(nets.epoch) if session.rank == 0 else []
    if session.rank == 0:
        artifacts.write_metrics(rows)  # drops epochs a crash left behind without a checkpoint
    divergence_guard = DivergenceGuard(config.on_divergence)
    collapse_guard = CollapseGuard(config.on_collapse)
    quality = QualityProbe(config, device) if config.eval_every else None
    rollbacks: list[Verdict] = []
    pending_note: dict | None = None  # what the next metrics row says about a rollback before it

    # The same global batch and steps per epoch at every world size an elastic run may take.
    batch_per_rank = config.batch_size // session.world_size
    num_images = train_set.images.shape[0]
    per_rank_images = (num_images - num_images % config.shard_multiple) // session.world_size
    steps_per_epoch = math.ceil(per_rank_images / batch_per_rank)
    first_step_s: float | None = None
    first_step_at = 0.0
    epoch_wall_s: list[float] = []
    stopped: Verdict | None = None
    while nets.epoch < config.epochs:
        epoch = nets.epoch + 1
        epoch_start_s = time.perf_counter()

        # Train one epoch on this rank's shard.
        indices = shard_indices(num_images, session.rank, session.world_size, epoch, config.seed, config.shard_multiple)
        sums = torch.zeros(len(STAT_NAMES), device=device)
        last_progress_s = epoch_start_s
        for batch_index, real_images in enumerate(iterate_batches(images_u8, indices, batch_per_rank)):
            noise = torch.randn(real_images.shape[0], config.noise_dim, device=device)
            stats = train_step(nets.generator, nets.discriminator, nets.optimizer_g, nets.optimizer_d, real_images, noise, amp_dtype)
            if nets.ema:
                nets.ema.update(unwrap(nets.generator))
            sums += torch.stack([stats[name] for name in STAT_NAMES])
            nets.step += 1
            if first_step_s is None:
                first_step_s = time.perf_counter() - started_s
                first_step_at = time.time()
            now_s = time.perf_counter()
            if session.rank == 0 and now_s - last_progress_s >= PROGRESS_EVERY_S:
                done = batch_index + 1
                rate = done * config.batch_size / (now_s - epoch_start_s)
                say(f"  epoch {epoch}/{config.epochs} step {done}/{steps_per_epoch} ({100 * done // steps_per_epoch}%) {rate:.0f} img/s")
                last_progress_s = now_s
        means = (mean_across_ranks(sums) / steps_per_epoch).tolist()  # waits for the device, once per epoch
        epoch_time_s = time.perf_counter() - epoch_start_s
        nets.epoch = epoch

        # Measure the epoch: losses, speed and, every eval_every epochs, quality.
        row = {
            "epoch": epoch,
            "step": nets.step,
            **{name: round(value, 6) if math.isfinite(value) else str(value) for name, value in zip(STAT_NAMES, means)},
            "images_per_s": round(per_rank_images * session.world_size / epoch_time_s, 1),
            "world_size": session.world_size,
            "epoch_time_s": round(epoch_time_s, 3),
        }
        if not epoch_wall_s:
            row["first_step_s"] = round(first_step_s or 0.0, 3)  # startup cost of this attempt
            row["first_step_at"] = round(first_step_at, 3)  # when it came (Unix time), to time a whole submission
            if resumed:  # a restart (a lost worker, or an elastic resize) redid the epoch it interrupted
                row["resumed"] = resumed
        if pending_note:
            row["after_rollback"], pending_note = pending_note, None
        verdicts = [divergence_guard.check({**row, **dict(zip(STAT_NAMES, means))})]
        if quality and (epoch % config.eval_every == 0 or epoch == config.epochs):
            scores = broadcast_object(quality.evaluate(nets.sampler) if session.rank == 0 else None)
            row["quality"] = scores
            verdicts.append(collapse_guard.check(epoch, scores["modes_covered"]))
        verdict = next((v for v in verdicts if v is not None), None)

        # Act on a guard: warn and go on, roll back to the last good checkpoint, or stop.
        if verdict:
            row["guard"] = {"guard": verdict.guard, "cause": verdict.cause, "action": verdict.action}
            print0(session, f"guard: {verdict.cause}; action: {verdict.action}")
            if verdict.action == "rollback" and len(rollbacks) >= MAX_ROLLBACKS:
                verdict = Verdict(verdict.guard, f"{verdict.cause}, after {MAX_ROLLBACKS} rollbacks", "stop")
                row["guard"]["action"] = "stop"
            if verdict.action == "rollback":
                rollbacks.append(verdict)
                nets.load_training_state(copy.deepcopy(last_good))
                torch.manual_seed(config.seed + session.rank + 7919 * len(rollbacks))  # not the same road again
                divergence_guard.forget()
                collapse_guard.forget()
                pending_note = {"cause": verdict.cause, "diverged_at_epoch": epoch, "resumed_from_epoch": nets.epoch}
                rows = [r for r in rows if r["epoch"] <= nets.epoch]
                if session.rank == 0:
                    artifacts.write_metrics(rows)
                print0(session, f"rolled back to epoch {nets.epoch} (step {nets.step})")
                continue
            if verdict.action == "stop":
                stopped = verdict

        # Record the epoch: sample grid, checkpoint when due, metrics line, status line.
        checkpoint_due = epoch % config.checkpoint_every == 0 or epoch == config.epochs or stopped is not None
        rng_states = gather_objects(rng_state()) if checkpoint_due else None
        checkpoint_dir = None
        try:
            if session.rank == 0:
                artifacts.write_sample_grid(epoch, sample_grid(nets.sampler, nets.fixed_noise, epoch))
                if checkpoint_due:
                    checkpoint_start_s = time.perf_counter()
                    checkpoint_dir = Path(tempfile.mkdtemp(prefix="gan-ckpt-"))
                    write_checkpoint(checkpoint_dir, {
                        "format_version": FORMAT_VERSION,
                        **nets.training_state(),
                        "rng": {"world_size": session.world_size, "states": rng_states},
                        "config": config.to_dict(),
                        "data_fingerprint": train_set.fingerprint,
                    })  # fmt: skip
                    # What training waits for: the upload to storage goes on in the background.
                    row["checkpoint_time_s"] = round(time.perf_counter() - checkpoint_start_s, 3)
            if stopped:
                row["stopped"] = stopped.cause
            # The metrics line goes in before the checkpoint: a crash in between re-runs the epoch,
            # and the resume drops the line again.
            rows.append(row)
            if session.rank == 0:
                artifacts.write_metrics(rows)
        except BaseException:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise
        session.report(row, checkpoint_dir)  # takes the folder over
        if checkpoint_due and verdict is None and not (divergence_guard.suspicious or collapse_guard.suspicious):
            last_good = nets.snapshot()  # only states no guard has doubts about
        epoch_wall_s.append(time.perf_counter() - epoch_start_s)
        eta_s = (config.epochs - epoch) * sum(epoch_wall_s) / len(epoch_wall_s)
        print0(
            session,
            f"epoch {epoch}/{config.epochs}  loss_d {means[0]:.4f}  loss_g {means[1]:.4f}  "
            f"D(x) {means[2]:.3f}  D(G(z)) {means[3]:.3f}  "
            f"{row['images_per_s']:.0f} img/s  {epoch_time_s:.1f}s  ETA {format_duration(eta_s)}"
            + (f"  modes {row['quality']['modes_covered']} fid {row['quality']['fid_classifier']:.2f}" if "quality" in row else ""),
        )
        if stopped:
            print0(session, f"stopped by the {stopped.guard} guard: {stopped.cause}")
            return

    # Finish: the model a consumer needs without Ray, and proof that the ranks agree.
    digests = gather_objects(parameter_digest(nets.generator, nets.discriminator))
    nodes = gather_objects(session.node_id)
    if session.rank == 0:
        rows = artifacts.read_metrics() or rows
        artifacts.write_generator(nets.sampler.state_dict())
        artifacts.write_json("model.json", {
            "config": config.to_dict(),
            "data": {"name": config.data, "fingerprint": train_set.fingerprint, "num_images": int(train_set.images.shape[0])},
            "epochs": config.epochs,
            "step": nets.step,
            "final_metrics": rows[-1] if rows else None,
            "param_digests": digests,  # one per rank, equal when DDP kept them in sync
            "nodes": nodes,  # the node of each rank, in rank order
            "generator": {"class": "gan.models.Generator", "kwargs": {"noise_dim": config.noise_dim}, "ema": nets.ema is not None},
        })  # fmt: skip
        if rows:
            artifacts.write_png("losses.png", loss_curves_png(rows))
        if quality and any("quality" in r for r in rows):
            artifacts.write_png("quality.png", quality_curves_png(rows))
        print0(session, f"done: {config.epochs} epochs, {nets.step} steps; artifacts in {artifacts.folder.uri}")


def sample_grid(generator: nn.Module, fixed_noise: torch.Tensor, epoch: int) -> bytes:
    """The tutorial's 4x4 grid from the fixed noise, with G in inference mode (BN running stats)."""
    model = unwrap(generator)  # never the DDP wrapper: only rank 0 draws, and DDP's forward syncs
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = model(fixed_noise.to(next(model.parameters()).device))
    model.train(was_training)
    return image_grid_png(images, title=f"epoch {epoch}")


def rng_state() -> dict:
    """This rank's random number generator states (CPU and, where present, CUDA)."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else torch.empty(0, dtype=torch.uint8),
    }


def restore_rng(saved: dict, session: WorkerSession, config: TrainConfig, start_epoch: int) -> None:
    """Continue each rank's random stream; with another world size, reseed per rank and epoch."""
    states = saved.get("states")
    if saved.get("world_size") == session.world_size and states:
        torch.set_rng_state(states[session.rank]["cpu"])
        if states[session.rank]["cuda"].numel() and session.device.type == "cuda":
            torch.cuda.set_rng_state(states[session.rank]["cuda"], session.device)
        return
    torch.manual_seed(config.seed + session.rank + 1_000_003 * start_epoch)
    print0(session, f"note: the checkpoint was written by {saved.get('world_size')} workers; random streams reseeded")
