"""The per-worker training loop. Ray-free: a `WorkerSession` supplies rank, device and storage.

Under Ray Train the session is `job.runtime.ray_session.RaySession`; in one process (the GPU epoch check,
fast tests) it is `job.runtime.local_session.LocalSession`. The loop is the same either way. It
reads as the story of an epoch; each part lives in its own module: the training state and its
checkpoint (`state`), one epoch of plain PyTorch (`gan.epoch`), the guards' policy (`guards`), and
what rank 0 writes after an epoch and at the end (`recorder`). The collective calls are all made here.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Protocol

import torch

from gan.epoch import STAT_NAMES, EpochShape, step_batches
from gan.step import amp_dtype_for
from gan.stepper import Stepper, prepare_cuda
from job.config import TrainConfig
from job.runtime.distributed import broadcast_object, gather_objects, mean_across_ranks, print0
from job.runtime.guards import Guards
from job.runtime.quality import QualityProbe
from job.runtime.recorder import Recorder
from job.runtime.state import HostSnapshot, TrainingState, rng_state
from job.runtime.feed import Feed, open_feed
from job.storage.checkpoint import load_from
from job.storage.location import Location

PROGRESS_EVERY_S = 15.0  # live step progress at most this often, so `ray job logs` stays readable


class WorkerSession(Protocol):
    """What the loop needs from whoever runs it (Ray Train, or one plain process)."""

    rank: int
    world_size: int
    device: torch.device
    run: Location  # `<storage>/<run-name>`
    node_id: str  # the Ray node this rank runs on ("local" in one process)

    def load_checkpoint(self) -> dict | None:
        """The state to resume from, or None for a fresh run."""

    def report(self, metrics: dict, checkpoint: HostSnapshot | None) -> None:
        """Hand over the epoch's metrics and (rank 0, when due) a checkpoint's host snapshot; all ranks call it.

        The session serialises and stores the snapshot, on Ray Train in the background.
        """

    def stream(self) -> tuple | None:
        """A streamed run's `StreamPlan` and this rank's Ray Data shard; None for a run that holds its images."""


def run_worker(config: TrainConfig, session: WorkerSession) -> None:
    """Train from the latest checkpoint (or from scratch) to `config.epochs`.

    The collective calls, which every rank makes in the same order: per epoch the steps' all-reduces (DDP's and
    the stats' mean), the quality broadcast when evaluated, the RNG gather when a checkpoint is due (inside the
    epoch too, every --checkpoint-every-steps), the report; at the end the digests' and the nodes' gathers.
    """
    started_s = time.perf_counter()  # this attempt's startup cost runs from here to its first step
    prepare_process(config, session)

    # Open the data (in memory or streamed), build the training state and start it where the driver decided.
    config, feed = open_feed(config, session)
    state, stepper, started = set_up(config, feed, session)
    recorder = Recorder(config, session.run, feed.record, state.epoch) if session.rank == 0 else None
    guards = Guards(config.on_divergence, config.on_collapse)
    quality = QualityProbe(config, feed.evaluation_data, session.device) if config.eval_every else None

    # The same global batch and steps per epoch at every world size an elastic run may take.
    clock = Clock(config, feed.shape, started_s)
    while state.epoch < config.epochs:
        epoch = state.epoch + 1

        # Train one epoch on this rank's shard, from where a checkpoint inside it left off.
        first_step = state.epoch_step
        clock.start_epoch(epoch, first_step)
        state.restore_epoch_sums(stepper.sums)
        on_step = in_epoch_checkpoints(config, state, stepper, session, clock, feed.shape.steps)
        steps = step_batches(stepper, feed.batches(epoch, first_step), on_step, first_step)
        means = (mean_across_ranks(stepper.take_sums()) / steps).tolist()  # waits for the device, once per epoch
        stats = dict(zip(STAT_NAMES, means))
        state.finish_epoch(epoch, steps)

        # Measure the epoch: losses, speed, the data's share and, every eval_every epochs, quality.
        row = clock.epoch_row(epoch, state.step, stats, started.get("resumed"))
        row.update(data_loading=feed.name, data_wait_time_s=round(feed.take_wait_s(), 3))
        row["dropped_images"] = feed.shape.dropped
        if "init_from" in started:
            row["init_from"] = started.pop("init_from")
        laps = Laps(row)  # where the rest of the epoch's time goes, part by part, into the row
        if quality and (epoch % config.eval_every == 0 or epoch == config.epochs):
            row["quality"] = broadcast_object(quality.evaluate(state.sampler) if recorder else None)
            laps.lap("evaluation_time_s")

        # Ask the guards what now: go on (warned or not), roll back to the last good state, or stop.
        verdict = guards.judge(row, stats)
        if verdict and verdict.action == "rollback":
            state.roll_back(guards.rollbacks)
            guards.rolled_back(to_epoch=state.epoch)
            if recorder:
                recorder.forget_after(state.epoch)
            continue

        # Record the epoch (the sample grid, the checkpoint when due, the metrics line) and report it.
        stopped = verdict is not None and verdict.action == "stop"
        record_epoch(state, session, recorder, guards, row, laps, checkpoint_due=checkpoint_due(config, epoch, stopped))
        clock.end_epoch()
        if recorder:
            recorder.status_line(row, stats, clock.epoch_time_s, clock.eta_s())
        if stopped:
            print0(f"stopped by the {verdict.guard} guard: {verdict.cause}")
            if recorder:
                recorder.close()
            return

    # Finish: proof that the ranks agree, and the model a consumer needs without Ray.
    digests = gather_objects(state.parameter_digest())
    nodes = gather_objects(session.node_id)
    if recorder:
        recorder.finish(state, digests, nodes)


def prepare_process(config: TrainConfig, session: WorkerSession) -> None:
    """Threads, this rank's random stream and the device, before anything else."""
    if config.cpus_per_worker:
        torch.set_num_threads(config.cpus_per_worker)  # Ray leaves one thread per worker otherwise
    torch.manual_seed(config.seed + session.rank)  # each rank draws its own noise and dropout masks
    prepare_cuda(session.device)  # cuDNN's kernel choice on each shape's first step, before any capture


def set_up(config: TrainConfig, feed: Feed, session: WorkerSession) -> tuple[TrainingState, Stepper, dict]:
    """The training state, started (`start`) and wrapped in DDP; its step over the feed's images (uint8 on the
    device, with a conditional run's labels: batches are cut there); and what `start` records."""
    state = TrainingState.build(config, feed.fingerprint, session.rank, session.world_size, session.device)
    started = start(state, config, session)
    state.wrap_ddp()
    stepper = state.build_stepper(feed.images_u8, feed.labels, amp_dtype_for(config.precision, session.device))
    return state, stepper, started


def in_epoch_checkpoints(
    config: TrainConfig, state: TrainingState, stepper: Stepper, session: WorkerSession, clock: Clock, steps: int
) -> Callable[[int], None]:
    """What runs after each step of an epoch of `steps`: the clock's progress and, every --checkpoint-every-steps
    (not at the epoch's end, which has its own), a checkpoint that records the position in the epoch and each
    rank's stat sums so far. Every rank steps alike, so every rank makes the checkpoint's collective calls."""
    every = config.checkpoint_every_steps

    def on_step(done: int) -> None:
        clock.on_step(done)
        if every and done % every == 0 and done < steps:
            state.enter_step(done)
            gathered = gather_objects({"rng": rng_state(), "sums": stepper.sums.cpu()})
            snapshot = (
                state.checkpoint([g["rng"] for g in gathered], [g["sums"] for g in gathered])
                if session.rank == 0
                else None
            )
            session.report({"epoch": state.epoch, "epoch_step": done, "step": state.step}, snapshot)

    return on_step


def start(state: TrainingState, config: TrainConfig, session: WorkerSession) -> dict:
    """Start `state` where the driver decided (`job.runtime.driver.decide_start`): the run's own newest checkpoint
    when it has one (a restarted worker group too), else the checkpoint --init-from was resolved to, else the
    fresh weights `state` holds. Returns what the metrics rows record of it: `resumed` (each attempt's first row),
    `init_from` (the run's first)."""
    checkpoint = session.load_checkpoint()
    if checkpoint is not None:
        return {"resumed": state.resume(checkpoint)}
    if config.init_from:
        source, donor = load_from(config.init_from, config.s3_endpoint, flag="--init-from")
        return {"init_from": state.warm_start(donor, source.uri)}
    return {}


def checkpoint_due(config: TrainConfig, epoch: int, stopped: bool) -> bool:
    """Every `--checkpoint-every` epochs, the last epoch, and an epoch a guard stops the run at."""
    return epoch % config.checkpoint_every == 0 or epoch == config.epochs or stopped


def record_epoch(
    state: TrainingState,
    session: WorkerSession,
    recorder: Recorder | None,  # rank 0's; None on the other ranks
    guards: Guards,
    row: dict,
    laps: Laps,
    checkpoint_due: bool,
) -> None:
    """The epoch's sample grid, its checkpoint when due (a host snapshot, written on the session's side), its metrics
    line, and the report every rank makes (the RNG gather and the report are collective calls)."""
    grid_png = recorder.sample_grid(state) if recorder else None
    laps.lap("sample_grid_time_s")
    snapshot = None
    if checkpoint_due:
        rng_states = gather_objects(rng_state())  # every rank's random streams: part of the checkpoint
        snapshot = state.checkpoint(rng_states) if recorder else None  # copies; written on the session's side
        laps.lap("checkpoint_time_s")  # what training waits for: serialising and storing go on behind it
    if recorder:
        recorder.write_epoch(row, grid_png)  # the metrics line before the checkpoint is reported
    laps.lap("artifacts_time_s")  # here and below: in metrics.jsonl from its next rewrite on
    session.report(dict(row), snapshot)  # a copy: Ray may read it on its upload thread while the row gains a lap
    laps.lap("report_time_s")
    if checkpoint_due and guards.trusted:
        state.keep_as_last_good()  # only states no guard has doubts about


class Laps:
    """Times the parts of an epoch after its steps, each into the row as `<part>_time_s`."""

    def __init__(self, row: dict) -> None:
        self.row = row
        self.since_s = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the time since the last lap (or since the steps) as `row[name]`, in seconds."""
        now_s = time.perf_counter()
        self.row[name] = round(now_s - self.since_s, 3)
        self.since_s = now_s


class Clock:
    """Wall-clock bookkeeping of one attempt: its startup cost, live step progress, epoch times, ETA."""

    def __init__(self, config: TrainConfig, shape: EpochShape, started_s: float) -> None:
        self.config = config
        self.world_size = shape.world_size
        self.per_rank_images = shape.per_rank
        self.steps_per_epoch = shape.steps
        self.first_step = 0  # steps of the current epoch done before this attempt (a resume inside it)
        self.started_s = started_s  # time.perf_counter() when the attempt began
        self.first_step_s: float | None = None  # from the attempt's start to its first step done
        self.first_step_at = 0.0  # when that was (Unix time)
        self.epoch_wall_s: list[float] = []  # of each recorded epoch, training through its report
        self.epoch = 0
        self.epoch_start_s = self.last_progress_s = self.started_s
        self.epoch_time_s = 0.0  # training time of the latest epoch

    def start_epoch(self, epoch: int, first_step: int = 0) -> None:
        self.epoch, self.first_step = epoch, first_step
        self.epoch_start_s = self.last_progress_s = time.perf_counter()

    def on_step(self, done: int) -> None:
        """After each step: time the attempt's first one; show live progress every PROGRESS_EVERY_S."""
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.started_s
            self.first_step_at = time.time()
        now_s = time.perf_counter()
        if now_s - self.last_progress_s >= PROGRESS_EVERY_S:
            rate = (done - self.first_step) * self.config.batch_size / (now_s - self.epoch_start_s)
            percent = 100 * done // self.steps_per_epoch
            steps = f"step {done}/{self.steps_per_epoch} ({percent}%)"
            print0(f"  epoch {self.epoch}/{self.config.epochs} {steps} {rate:.0f} img/s")
            self.last_progress_s = now_s

    def epoch_row(self, epoch: int, step: int, stats: dict[str, float], resumed: dict | None) -> dict:
        """The epoch's metrics row: losses and speed; on an attempt's first row, its startup cost and resume."""
        self.epoch_time_s = time.perf_counter() - self.epoch_start_s
        row = {
            "epoch": epoch,
            "step": step,
            **{name: round(value, 6) if math.isfinite(value) else str(value) for name, value in stats.items()},
            "images_per_s": round(self.per_rank_images * self.world_size * self.share_done() / self.epoch_time_s, 1),
            "world_size": self.world_size,
            "epoch_time_s": round(self.epoch_time_s, 3),
            "step_time_s": round(self.epoch_time_s, 3),  # the breakdown's first part (the laps follow): the same span
        }
        if not self.epoch_wall_s:
            row["first_step_s"] = round(self.first_step_s or 0.0, 3)  # startup cost of this attempt
            row["first_step_at"] = round(self.first_step_at, 3)  # when it came (Unix time), to time a whole submission
            if resumed:  # a restart (a lost worker, or an elastic resize) redid the epoch it interrupted
                row["resumed"] = resumed
        return row

    def share_done(self) -> float:
        """The share of the epoch's steps this attempt made (all, unless it resumed inside the epoch)."""
        return 1.0 - self.first_step / max(self.steps_per_epoch, 1)

    def end_epoch(self) -> None:
        """Close the epoch's wall time: its steps through its report."""
        self.epoch_wall_s.append(time.perf_counter() - self.epoch_start_s)

    def eta_s(self) -> float:
        """The run's remaining time in seconds, from the mean wall time of the epochs so far."""
        return (self.config.epochs - self.epoch) * sum(self.epoch_wall_s) / len(self.epoch_wall_s)
