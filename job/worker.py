"""The per-worker training loop. Ray-free: a `WorkerSession` supplies rank, device and storage.

Under Ray Train the session is `job.ray_worker.RaySession`; in one process (the GPU epoch check,
fast tests) it is `job.local_session.LocalSession`. The loop is the same either way.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Protocol

import torch

from gan.data import iterate_batches, load_split, shard_indices
from gan.models import Discriminator, Generator
from gan.plots import image_grid_png, loss_curves_png
from gan.step import amp_dtype_for, make_optimizer, train_step
from job.artifacts import RunArtifacts
from job.checkpoint import FORMAT_VERSION, write_checkpoint
from job.config import SHAPE_FIELDS, TrainConfig
from job.console import say
from job.data_source import local_data_folder
from job.distributed import gather_objects, mean_across_ranks, parameter_digest, unwrap, wrap_ddp
from job.errors import UsageError
from job.storage import Location

NUM_SAMPLES = 16  # the tutorial's 4x4 grid of fixed-noise samples
PROGRESS_EVERY_S = 15.0  # live step progress at most this often, so `ray job logs` stays readable
STAT_NAMES = ("loss_d", "loss_g", "d_real_prob", "d_fake_prob")


class WorkerSession(Protocol):
    """What the loop needs from whoever runs it (Ray Train, or one plain process)."""

    rank: int
    world_size: int
    device: torch.device
    run: Location  # `<storage>/<run-name>`

    def load_checkpoint(self) -> dict | None:
        """The state to resume from, or None for a fresh run."""

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Hand over the epoch's metrics and (rank 0, when due) a checkpoint folder; all ranks call it."""


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

    # Build the networks and optimizers; restore them when resuming.
    # channels_last: the convolution layout oneDNN and cuDNN run fastest (measured in `bench`).
    generator = Generator(config.noise_dim).to(device, memory_format=torch.channels_last)
    discriminator = Discriminator().to(device, memory_format=torch.channels_last)
    amp_dtype = amp_dtype_for(config.precision, device)
    optimizer_g = make_optimizer(generator, config.lr)
    optimizer_d = make_optimizer(discriminator, config.lr)
    fixed_noise = torch.randn(NUM_SAMPLES, config.noise_dim, generator=torch.Generator().manual_seed(config.seed))
    start_epoch, step = 1, 0
    state = session.load_checkpoint()
    if state is not None:
        check_resumable(config, state)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        optimizer_g.load_state_dict(state["optimizer_g"])
        optimizer_d.load_state_dict(state["optimizer_d"])
        fixed_noise = state["fixed_noise"]
        start_epoch, step = state["epoch"] + 1, state["step"]
        restore_rng(state["rng"], session, config, start_epoch)
        if state["data_fingerprint"] != train_set.fingerprint:
            print0(session, f"warning: run {config.run_name} was trained on other data ({state['data_fingerprint']}); continuing on {train_set.fingerprint}")
        print0(session, f"resuming run {config.run_name} at epoch {start_epoch} (step {step})")
    generator_ddp = wrap_ddp(generator, device)
    discriminator_ddp = wrap_ddp(discriminator, device)

    artifacts = RunArtifacts(session.run)
    rows = artifacts.metrics_through(start_epoch - 1) if session.rank == 0 else []
    if session.rank == 0:
        artifacts.write_metrics(rows)  # drops epochs a crash left behind without a checkpoint

    per_rank_images = train_set.images.shape[0] // session.world_size
    steps_per_epoch = math.ceil(per_rank_images / config.batch_size_per_worker)
    first_step_s: float | None = None
    epoch_wall_s: list[float] = []
    for epoch in range(start_epoch, config.epochs + 1):
        epoch_start_s = time.perf_counter()

        # Train one epoch on this rank's shard.
        indices = shard_indices(train_set.images.shape[0], session.rank, session.world_size, epoch, config.seed)
        sums = torch.zeros(len(STAT_NAMES), device=device)
        last_progress_s = epoch_start_s
        for batch_index, real_images in enumerate(iterate_batches(images_u8, indices, config.batch_size_per_worker)):
            noise = torch.randn(real_images.shape[0], config.noise_dim, device=device)
            stats = train_step(generator_ddp, discriminator_ddp, optimizer_g, optimizer_d, real_images, noise, amp_dtype)
            sums += torch.stack([stats[name] for name in STAT_NAMES])
            step += 1
            if first_step_s is None:
                first_step_s = time.perf_counter() - started_s
            now_s = time.perf_counter()
            if session.rank == 0 and now_s - last_progress_s >= PROGRESS_EVERY_S:
                done = batch_index + 1
                rate = done * config.batch_size / (now_s - epoch_start_s)
                say(f"  epoch {epoch}/{config.epochs} step {done}/{steps_per_epoch} ({100 * done // steps_per_epoch}%) {rate:.0f} img/s")
                last_progress_s = now_s
        means = (mean_across_ranks(sums) / steps_per_epoch).tolist()  # waits for the device, once per epoch
        epoch_time_s = time.perf_counter() - epoch_start_s

        # Record the epoch: metrics line, sample grid, status line (rank 0).
        row = {
            "epoch": epoch,
            "step": step,
            **{name: round(value, 6) for name, value in zip(STAT_NAMES, means)},
            "images_per_s": round(per_rank_images * session.world_size / epoch_time_s, 1),
            "epoch_time_s": round(epoch_time_s, 3),
        }
        if epoch == start_epoch:
            row["first_step_s"] = round(first_step_s or 0.0, 3)  # startup cost of this attempt
        checkpoint_due = epoch % config.checkpoint_every == 0 or epoch == config.epochs
        rng_states = gather_objects(rng_state()) if checkpoint_due else None
        with contextlib.ExitStack() as stack:
            checkpoint_dir = None
            if session.rank == 0:
                artifacts.write_sample_grid(epoch, sample_grid(generator, fixed_noise, epoch))
                if checkpoint_due:
                    checkpoint_start_s = time.perf_counter()
                    checkpoint_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gan-ckpt-")))
                    write_checkpoint(checkpoint_dir, {
                        "format_version": FORMAT_VERSION,
                        "generator": unwrap(generator_ddp).state_dict(),
                        "discriminator": unwrap(discriminator_ddp).state_dict(),
                        "optimizer_g": optimizer_g.state_dict(),
                        "optimizer_d": optimizer_d.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "fixed_noise": fixed_noise,
                        "rng": {"world_size": session.world_size, "states": rng_states},
                        "config": config.to_dict(),
                        "data_fingerprint": train_set.fingerprint,
                    })  # fmt: skip
                    row["checkpoint_time_s"] = round(time.perf_counter() - checkpoint_start_s, 3)
            # The metrics line goes in before the checkpoint: a crash in between re-runs the epoch,
            # and the resume drops the line again.
            if session.rank == 0:
                rows.append(row)
                artifacts.write_metrics(rows)
            session.report(row, checkpoint_dir)
        epoch_wall_s.append(time.perf_counter() - epoch_start_s)
        eta_s = (config.epochs - epoch) * sum(epoch_wall_s) / len(epoch_wall_s)
        print0(
            session,
            f"epoch {epoch}/{config.epochs}  loss_d {row['loss_d']:.4f}  loss_g {row['loss_g']:.4f}  "
            f"D(x) {row['d_real_prob']:.3f}  D(G(z)) {row['d_fake_prob']:.3f}  "
            f"{row['images_per_s']:.0f} img/s  {epoch_time_s:.1f}s  ETA {format_duration(eta_s)}",
        )

    # Finish: the model a consumer needs without Ray, and proof that the ranks agree.
    digests = gather_objects(parameter_digest(generator_ddp, discriminator_ddp))
    if session.rank == 0:
        rows = artifacts.read_metrics() or rows
        artifacts.write_generator(unwrap(generator_ddp).state_dict())
        artifacts.write_json("model.json", {
            "config": config.to_dict(),
            "data": {"name": config.data, "fingerprint": train_set.fingerprint, "num_images": int(train_set.images.shape[0])},
            "epochs": config.epochs,
            "step": step,
            "final_metrics": rows[-1] if rows else None,
            "param_digests": digests,  # one per rank, equal when DDP kept them in sync
            "generator": {"class": "gan.models.Generator", "kwargs": {"noise_dim": config.noise_dim}},
        })  # fmt: skip
        if rows:
            artifacts.write_png("losses.png", loss_curves_png(rows))
        print0(session, f"done: {config.epochs} epochs, {step} steps; artifacts in {artifacts.folder.uri}")


def sample_grid(generator: torch.nn.Module, fixed_noise: torch.Tensor, epoch: int) -> bytes:
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
