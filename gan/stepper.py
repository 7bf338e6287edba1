"""The training step over fixed buffers: run eagerly, or on CUDA replayed as one graph per batch shape.

Everything a step changes lives in device tensors that outlive it: the weights, both optimizers'
state, the EMA's update count, and the stat sums, which each step adds to in place. Its real
images are cut on the device from the training set by a buffer of indices. A CUDA graph captured
once can then replay the whole step (G's and D's forward, both backward passes, both Adam steps,
the EMA and the stat sums) with nothing decided on the host, as PyTorch's CUDA notes
("Whole-network capture") describe. On a CPU, or with graphs off, the same code runs eagerly.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gan.data import to_unit_range
from gan.step import STAT_NAMES, GeneratorEMA, train_step

WARMUP_STEPS = 3  # eager steps of a batch shape before it is captured (cuDNN's choice, optimizer state)
DDP_WARMUP_STEPS = 11  # under DDP: PyTorch's CUDA notes ask for at least 11 eager iterations before capture
CUDA_GRAPHS_MODES = ("auto", "on", "off")
# What `auto` means on CUDA. Off until a GPU run of benchmarks/gpu_check.py has shown the graphed step
# bitwise equal to the eager one, and faster (docs/performance.md); a CPU is always eager.
AUTO_ON_CUDA = False


def graphs_wanted(mode: str, device: torch.device) -> bool:
    """Whether `--cuda-graphs MODE` replays the step as CUDA graphs on `device` (`on` needs CUDA)."""
    if mode not in CUDA_GRAPHS_MODES:
        raise ValueError(f"cuda graphs mode {mode!r} is not one of {CUDA_GRAPHS_MODES}")
    if mode == "on" and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device.type}")
    return device.type == "cuda" and (mode == "on" or (mode == "auto" and AUTO_ON_CUDA))


def prepare_cuda(device: torch.device, tf32_matmul: bool = False) -> None:
    """Process-wide CUDA settings for training on `device`: cuDNN picks its fastest kernels on the
    first step of each shape (before any capture); `tf32_matmul` lets float32 matmuls use TF32."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high" if tf32_matmul else "highest")


class Stepper:
    """Training steps of one rank on batches of its training images, by image index.

    `step(batch_indices)` runs one step and adds its stats to `sums`; `take_sums()` hands them over.
    With `cuda_graphs`, each batch shape runs `warmup_steps` real steps eagerly on a side stream,
    then is captured once and replayed from then on; `forget_graphs()` drops the graphs after the
    optimizers' state has been replaced (a resume, a rollback), so the next steps capture anew.
    """

    def __init__(
        self,
        generator: nn.Module,  # plain or DDP-wrapped
        discriminator: nn.Module,  # plain or DDP-wrapped
        optimizer_g: torch.optim.Optimizer,  # capturable=True where cuda_graphs
        optimizer_d: torch.optim.Optimizer,
        images_u8: torch.Tensor,  # (N, 1, 28, 28) uint8 training images, on the networks' device
        noise_dim: int,  # length of each noise vector
        amp_dtype: torch.dtype | None = None,  # autocast dtype; None = float32 throughout
        ema: GeneratorEMA | None = None,  # updated after each step; None = no EMA
        labels: torch.Tensor | None = None,  # (N,) int64 class of each image, on its device; None = unconditional
        cuda_graphs: bool = False,  # replay each batch shape as a CUDA graph (CUDA only)
        warmup_steps: int = WARMUP_STEPS,  # eager steps of each shape before its capture
        stream: torch.cuda.Stream | None = None,  # warm-up's and capture's side stream (DDP's); None = a new one
    ) -> None:
        if cuda_graphs and images_u8.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the training images on a CUDA device, not {images_u8.device}")
        self.generator, self.discriminator = generator, discriminator
        self.optimizer_g, self.optimizer_d = optimizer_g, optimizer_d
        self.images_u8, self.labels = images_u8, labels
        self.noise_dim, self.amp_dtype, self.ema = noise_dim, amp_dtype, ema
        self.cuda_graphs, self.warmup_steps = cuda_graphs, warmup_steps
        self.sums = torch.zeros(len(STAT_NAMES), device=images_u8.device)  # summed in place, also by replays
        self.stream = (stream or torch.cuda.Stream(images_u8.device)) if cuda_graphs else None
        self.graphs: dict[int, Callable[[torch.Tensor], None]] = {}  # batch size → its replay
        self.eager_steps: Counter[int] = Counter()  # batch size → eager steps since the last forget_graphs

    def step(self, batch_indices: torch.Tensor) -> None:
        """One training step on the images at `batch_indices` (device int64): eager, or a graph's replay."""
        size = batch_indices.shape[0]
        if size in self.graphs:
            self.graphs[size](batch_indices)
        elif not self.cuda_graphs:
            self._step(batch_indices)
        elif self.eager_steps[size] < self.warmup_steps:
            self._warm_up(batch_indices)
            self.eager_steps[size] += 1
        else:  # capture executes nothing: the replay that follows is this batch's step
            self.graphs[size] = self._capture(batch_indices)
            self.graphs[size](batch_indices)

    def take_sums(self) -> torch.Tensor:
        """The stats summed since the last call (a copy, still on the device); the sums restart at zero."""
        sums = self.sums.clone()
        self.sums.zero_()
        return sums

    def forget_graphs(self) -> None:
        """Drop the graphs (they hold the optimizers' old state tensors): the next steps warm up and capture anew."""
        self.graphs.clear()
        self.eager_steps.clear()

    def _step(self, batch_indices: torch.Tensor) -> None:
        """The step itself: what an eager call runs and a graph captures."""
        real_images = to_unit_range(self.images_u8.index_select(0, batch_indices))
        real_labels = self.labels.index_select(0, batch_indices).long() if self.labels is not None else None
        noise = torch.randn(batch_indices.shape[0], self.noise_dim, device=self.images_u8.device)
        stats = train_step(
            self.generator,
            self.discriminator,
            self.optimizer_g,
            self.optimizer_d,
            real_images,
            noise,
            self.amp_dtype,
            labels=real_labels,
        )
        if self.ema is not None:  # the average follows the plain module, never the DDP wrapper
            generator = self.generator
            self.ema.update(generator.module if isinstance(generator, DistributedDataParallel) else generator)
        self.sums.add_(torch.stack([stats[name] for name in STAT_NAMES]))

    def _warm_up(self, batch_indices: torch.Tensor) -> None:
        """A real step, eagerly on the side stream that captures later (PyTorch's CUDA notes)."""
        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self._step(batch_indices)
        torch.cuda.current_stream().wait_stream(self.stream)

    def _capture(self, batch_indices: torch.Tensor) -> Callable[[torch.Tensor], None]:
        """Capture the step for `batch_indices`'s shape; returns its replay, which copies a batch's indices in first."""
        static_indices = batch_indices.clone()  # allocated before capture, so it outlives it
        replay = self._record(static_indices)

        def step(indices: torch.Tensor) -> None:
            static_indices.copy_(indices)
            replay()

        return step

    def _record(self, static_indices: torch.Tensor) -> Callable[[], None]:
        """One CUDA graph of the step on `static_indices`, on the warm-up's side stream; returns its replay."""
        graph = torch.cuda.CUDAGraph()
        # The gradients are made inside the capture, from the graph's own memory.
        self.optimizer_g.zero_grad(set_to_none=True)
        self.optimizer_d.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, stream=self.stream):
            self._step(static_indices)
        return graph.replay
