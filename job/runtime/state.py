"""The training state of one worker: G, D, their optimizers, the EMA and the position, built into a checkpoint's
dict and rebuilt from one (`job.storage.checkpoint_schema` says what the dict holds).

Why: docs/architecture.md#checkpoints
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from gan.models import Discriminator, Generator, parameter_digest
from gan.sampling import class_grid_inputs, seeded_noise
from gan.step import GeneratorEMA, make_optimizer, set_capturable
from gan.stepper import DDP_WARMUP_STEPS, WARMUP_STEPS, Stepper, graphs_wanted
from job.config import EARLIER_SHAPE, TrainConfig
from job.runtime.distributed import print0, unwrap, wrap_ddp
from job.storage.checkpoint_schema import FORMAT_VERSION, check_resumable

NUM_SAMPLES = 16  # the tutorial's 4x4 grid of fixed-noise samples
GRID_PER_CLASS = 10  # a conditional run's grid: one row of this many per class (10x10 for 10 classes)
ROLLBACK_SEED_STRIDE = 7919  # a rollback reseeds by this much per rollback: not the same road again
RESEED_EPOCH_STRIDE = 1_000_003  # another world size reseeds each rank by this much per epoch


def grid_inputs(config: TrainConfig, num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed noise (and labels) of a run's sample grid: the tutorial's 4x4, or one row per class."""
    if not num_classes:
        return seeded_noise(NUM_SAMPLES, config.noise_dim, config.seed), None
    return class_grid_inputs(num_classes, GRID_PER_CLASS, config.noise_dim, config.seed)


def rng_state() -> dict:
    """This rank's random number generator states (CPU and, where present, CUDA)."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": (
            torch.cuda.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else torch.empty(0, dtype=torch.uint8)
        ),
    }


@dataclass(frozen=True)
class HostSnapshot:
    """A checkpoint dict whose tensors are host copies, still filling where they came from a GPU.

    Training goes on at once: the copies are queued on the device's stream (into pinned memory, so
    they do not wait), ahead of the next step that changes the weights. Whoever serialises it calls
    `wait()` first: on Ray Train that is the upload thread, off the step's path.
    """

    state: dict
    copied: torch.cuda.Event | None  # recorded after the last copy; None when every tensor was on the CPU

    @classmethod
    def of(cls, state: dict) -> HostSnapshot:
        devices: list[torch.device] = []
        copy = _host_copy(state, devices)
        event = None
        if devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(devices[0]))  # the stream the copies were queued on
        return cls(copy, event)

    def wait(self) -> dict:
        """The checkpoint dict, once its copies have landed."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.state


def _host_copy(value: object, devices: list[torch.device]) -> object:
    """`value` with each tensor copied to the host: a clone on the CPU, a non-blocking copy from a GPU."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return value.detach().clone()  # the weights change in place next step: never share them
        devices.append(value.device)
        host = torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device="cpu", pin_memory=True)
        return host.copy_(value.detach(), non_blocking=True)
    if isinstance(value, dict):
        return {key: _host_copy(item, devices) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(item, devices) for item in value)
    return value


@dataclass
class TrainingState:
    """G, D, their optimizers, G's EMA, the position and the fixed noise of one rank of one run."""

    config: TrainConfig
    data_fingerprint: str  # of the images this attempt trains on
    rank: int
    world_size: int
    device: torch.device
    generator: nn.Module  # DDP-wrapped after `wrap_ddp` where there is more than one rank
    discriminator: nn.Module
    optimizer_g: torch.optim.Optimizer
    optimizer_d: torch.optim.Optimizer
    ema: GeneratorEMA | None
    fixed_noise: torch.Tensor  # the sample grid's noise, the same for the whole run (stored in each checkpoint)
    num_classes: int = 0  # classes G and D are conditional on; 0 = unconditional
    cuda_graphs: bool = False  # the step is replayed as CUDA graphs (optimizers capturable)
    side_stream: torch.cuda.Stream | None = field(default=None, repr=False)  # with cuda_graphs: DDP's, then the graphs'
    stepper: Stepper | None = field(default=None, repr=False)  # set by `build_stepper`, after `wrap_ddp`
    epoch: int = 0  # last finished epoch
    step: int = 0  # optimizer steps so far
    epoch_step: int = 0  # steps of the epoch in progress done so far (at a checkpoint inside it)
    epoch_sums: list[torch.Tensor] | None = field(default=None, repr=False)  # each rank's stat sums at that point
    last_good: dict = field(default_factory=dict, repr=False)  # what a rollback returns to

    @classmethod
    def build(
        cls, config: TrainConfig, data_fingerprint: str, rank: int, world_size: int, device: torch.device
    ) -> TrainingState:
        """Fresh networks for `config` (its data's shape and classes resolved) on `device`, drawn from the global RNG
        (seed it first)."""
        num_classes = (config.num_classes or 0) if config.conditional else 0
        shape = (config.resolution or EARLIER_SHAPE["resolution"], config.channels or EARLIER_SHAPE["channels"])
        cuda_graphs = graphs_wanted(config.cuda_graphs, device)
        # channels_last: the convolution layout oneDNN and cuDNN run fastest (measured with `bench`).
        generator = Generator(config.noise_dim, num_classes, *shape).to(device, memory_format=torch.channels_last)
        discriminator = Discriminator(num_classes, *shape).to(device, memory_format=torch.channels_last)
        return cls(
            config=config,
            data_fingerprint=data_fingerprint,
            rank=rank,
            world_size=world_size,
            device=device,
            generator=generator,
            discriminator=discriminator,
            optimizer_g=make_optimizer(generator, config.lr, config.beta1, cuda_graphs),
            optimizer_d=make_optimizer(discriminator, config.lr, config.beta1, cuda_graphs),
            ema=GeneratorEMA(generator, config.ema_decay) if config.ema_decay > 0 else None,
            fixed_noise=grid_inputs(config, num_classes)[0],
            num_classes=num_classes,
            cuda_graphs=cuda_graphs,
        )

    @property
    def sampler(self) -> nn.Module:
        """The generator that makes samples and the final model: the EMA where there is one."""
        return self.ema.module if self.ema else unwrap(self.generator)

    @property
    def fixed_labels(self) -> torch.Tensor | None:
        """The sample grid's labels: one row of each class, 0…0, 1…1, …; None for an unconditional run."""
        if not self.num_classes:
            return None
        return torch.arange(self.num_classes).repeat_interleave(self.fixed_noise.shape[0] // self.num_classes)

    @property
    def grid_columns(self) -> int | None:
        """Images per row of the sample grid: a conditional run's per class; None = square (4x4)."""
        return self.fixed_noise.shape[0] // self.num_classes if self.num_classes else None

    def wrap_ddp(self) -> None:
        """Wrap G and D in DDP (gradients averaged every step), and take this state as the last good one."""
        self.side_stream = torch.cuda.Stream(self.device) if self.cuda_graphs else None
        self.generator = wrap_ddp(self.generator, self.device, self.side_stream)
        self.discriminator = wrap_ddp(self.discriminator, self.device, self.side_stream)
        self.keep_as_last_good()

    def build_stepper(
        self, images_u8: torch.Tensor, labels: torch.Tensor | None, amp_dtype: torch.dtype | None
    ) -> Stepper:
        """The training step over these images (after `wrap_ddp`): eager, or replayed as CUDA graphs."""
        self.stepper = Stepper(
            self.generator,
            self.discriminator,
            self.optimizer_g,
            self.optimizer_d,
            images_u8,
            self.config.noise_dim,
            amp_dtype,
            self.ema,
            labels,
            cuda_graphs=self.cuda_graphs,
            warmup_steps=WARMUP_STEPS if unwrap(self.generator) is self.generator else DDP_WARMUP_STEPS,
            stream=self.side_stream,
        )
        return self.stepper

    def resume(self, checkpoint: dict) -> dict:
        """Continue from `checkpoint` (after checking it fits); returns what its first metrics row says of it."""
        check_resumable(self.config, checkpoint)
        self._load(checkpoint)
        self._restore_rng(checkpoint["rng"])
        before = self._set_hyperparameters()
        if before != (self.config.lr, self.config.beta1):  # a resume applies the command line's, and says so
            print0(
                f"note: run {self.config.run_name} goes on with --lr {self.config.lr} --beta1 {self.config.beta1} "
                f"(its checkpoint had lr {before[0]}, beta1 {before[1]})"
            )
        if checkpoint["data_fingerprint"] != self.data_fingerprint:
            print0(
                f"warning: run {self.config.run_name} was trained on other data ({checkpoint['data_fingerprint']}); "
                f"continuing on {self.data_fingerprint}"
            )
        inside = f", step {self.epoch_step + 1} of the epoch" if self.epoch_step else ""
        print0(
            f"resuming run {self.config.run_name} at epoch {self.epoch + 1} (step {self.step}{inside}) "
            f"on {self.world_size} worker(s)"
        )
        before = checkpoint["rng"].get("world_size")
        resumed = {"from_epoch": self.epoch, "from_step": self.step, "world_size_before": before}
        return {**resumed, "from_epoch_step": self.epoch_step} if self.epoch_step else resumed

    def warm_start(self, checkpoint: dict, source: str) -> dict:
        """Start this new run from another run's `checkpoint` (`--init-from`): its weights, both optimizers'
        state and its EMA, with this run's lr and beta1 written into the optimizers. The position, the grid
        noise and the random streams stay this run's own: it starts at epoch 1. Returns what its first metrics
        row records of it."""
        check_resumable(self.config, checkpoint, init_from=source)
        self._load_networks(checkpoint)
        self._set_hyperparameters()
        started = {"uri": source, "epoch": int(checkpoint["epoch"]), "parameter_digest": self.parameter_digest()}
        taken = "weights, optimizer state and EMA" if self.ema else "weights and optimizer state"
        print0(
            f"warm start of run {self.config.run_name} from {source} (its epoch {started['epoch']}): {taken}; "
            f"--lr {self.config.lr} --beta1 {self.config.beta1}"
        )
        return started

    def checkpoint(self, rng_states: list[dict], epoch_sums: list[torch.Tensor] | None = None) -> HostSnapshot:
        """The checkpoint of this state, copied to host memory without waiting (rank 0).

        `rng_states` are every rank's `rng_state()`, gathered by the caller (a collective call); `epoch_sums`,
        inside an epoch, every rank's stat sums of it so far.
        """
        return HostSnapshot.of(
            {
                "format_version": FORMAT_VERSION,
                **self._weights_and_position(),
                "rng": {"world_size": self.world_size, "states": rng_states},
                "config": self.config.to_dict(),
                "data_fingerprint": self.data_fingerprint,
                # unconditional: format 2's keys exactly
                **({"num_classes": self.num_classes} if self.num_classes else {}),
                **({"epoch_sums": epoch_sums} if self.epoch_step else {}),
            }
        )

    def enter_step(self, done: int) -> None:
        """`done` steps of the epoch in progress are made: the run's step count follows."""
        self.step += done - self.epoch_step
        self.epoch_step = done

    def finish_epoch(self, epoch: int, steps: int) -> None:
        """Epoch `epoch` is made, in `steps` steps."""
        self.enter_step(steps)
        self.epoch, self.epoch_step = epoch, 0

    def restore_epoch_sums(self, sums: torch.Tensor) -> None:
        """Start the epoch's stat sums (on the device) where a checkpoint inside it had them: this rank's own, or,
        written by another number of ranks, their total on rank 0 scaled to keep their mean; else from zero."""
        saved, self.epoch_sums = self.epoch_sums, None
        sums.zero_()
        if not saved or not self.epoch_step:
            return
        if len(saved) == self.world_size:
            sums.copy_(saved[self.rank])
        elif self.rank == 0:
            sums.copy_(torch.stack(saved).sum(0) * self.world_size / len(saved))

    def keep_as_last_good(self) -> None:
        """Remember this state (a private copy) as the one a rollback returns to."""
        self.last_good = copy.deepcopy(self._weights_and_position())

    def roll_back(self, rollbacks: int) -> None:
        """Return to the last good state, with random streams of their own for the `rollbacks`-th retry."""
        self._load(copy.deepcopy(self.last_good))
        torch.manual_seed(self.config.seed + self.rank + ROLLBACK_SEED_STRIDE * rollbacks)  # not the same road again
        print0(f"rolled back to epoch {self.epoch} (step {self.step})")

    def parameter_digest(self) -> str:
        """A hash of G's and D's parameters: equal on all ranks when DDP keeps them in sync."""
        return parameter_digest(unwrap(self.generator), unwrap(self.discriminator))

    def _weights_and_position(self) -> dict:
        state = {
            "generator": unwrap(self.generator).state_dict(),
            "discriminator": unwrap(self.discriminator).state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(),
            "optimizer_d": self.optimizer_d.state_dict(),
            "fixed_noise": self.fixed_noise,
            "epoch": self.epoch,
            "step": self.step,
        }
        if self.epoch_step:  # a checkpoint inside an epoch: the steps of it done (format 2's keys otherwise)
            state["epoch_step"] = self.epoch_step
        if self.ema:
            state["ema_generator"] = self.ema.module.state_dict()
            state["ema_updates"] = self.ema.updates
        return state

    def _load(self, state: dict) -> None:
        self._load_networks(state)
        self.fixed_noise = state["fixed_noise"]
        self.epoch, self.step = state["epoch"], state["step"]
        self.epoch_step, self.epoch_sums = int(state.get("epoch_step", 0)), state.get("epoch_sums")

    def _set_hyperparameters(self) -> tuple[float, float]:
        """Write this run's lr and beta1 into both optimizers (a load restores the checkpoint's); the old ones."""
        group = self.optimizer_g.param_groups[0]
        before = (group["lr"], group["betas"][0])
        for optimizer in (self.optimizer_g, self.optimizer_d):
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = self.config.lr, (self.config.beta1, group["betas"][1])
        return before

    def _load_networks(self, state: dict) -> None:
        """G, D, both optimizers and the EMA from `state` (a checkpoint, or the last good state)."""
        unwrap(self.generator).load_state_dict(state["generator"])
        unwrap(self.discriminator).load_state_dict(state["discriminator"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        # The load restored the saved `capturable` and replaced the state tensors a captured graph holds.
        for optimizer in (self.optimizer_g, self.optimizer_d):
            set_capturable(optimizer, self.cuda_graphs)
        if self.stepper is not None:
            self.stepper.forget_graphs()
        if self.ema:  # a run that turns the EMA on later starts it from the current G
            self.ema.module.load_state_dict(state.get("ema_generator") or state["generator"])
            self.ema.updates = int(state.get("ema_updates", 0))

    def _restore_rng(self, saved: dict) -> None:
        """Continue each rank's random stream; with another world size, reseed per rank and epoch."""
        states = saved.get("states")
        if saved.get("world_size") == self.world_size and states:
            torch.set_rng_state(states[self.rank]["cpu"])
            if states[self.rank]["cuda"].numel() and self.device.type == "cuda":
                torch.cuda.set_rng_state(states[self.rank]["cuda"], self.device)
            return
        torch.manual_seed(self.config.seed + self.rank + RESEED_EPOCH_STRIDE * (self.epoch + 1))
        print0(f"note: the checkpoint was written by {saved.get('world_size')} workers; random streams reseeded")
