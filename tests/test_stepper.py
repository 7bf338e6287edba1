"""The graphable step (gan.stepper) computes what the step before it did, bitwise, and its graph
bookkeeping (warm-up, one capture per batch shape, replays, recapture after a load) holds on a CPU.

The reference is the epoch as it was before the step became graphable (commit f9b4e64): Python
slices of the indices, a per-step Python-float EMA weight, `sums +=`. It is kept here, frozen, as
the oracle. Every operation of the new step is the one the old step ran, with the same inputs in
the same order (the EMA's weight is the same float32 number, now held in a tensor), so the
results are compared bitwise, not within a tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gan.data import iterate_batches, shard_indices
from gan.epoch import STAT_NAMES, train_epoch
from gan.models import Discriminator, Generator
from gan.step import GeneratorEMA, make_optimizer, set_capturable, train_step
from gan.stepper import Stepper

NOISE_DIM = 8
NUM_IMAGES = 40  # with batch 16: two full batches and a last one of 8


class ReferenceEMA:
    """GeneratorEMA as it was: a Python int count and a Python float weight per step."""

    def __init__(self, generator: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for averaged, live in zip(self.module.parameters(), generator.parameters()):
            averaged.lerp_(live.detach(), 1.0 - decay)
        for averaged, live in zip(self.module.buffers(), generator.buffers()):
            averaged.copy_(live)


def reference_epoch(g, d, opt_g, opt_d, images_u8, indices, batch_size, amp_dtype, ema, labels) -> torch.Tensor:
    """gan.epoch.train_epoch as it was; returns its stat sums."""
    sums = torch.zeros(len(STAT_NAMES))
    if labels is not None:
        batches = iterate_batches(images_u8, indices, batch_size, labels)
    else:
        batches = ((images, None) for images in iterate_batches(images_u8, indices, batch_size))
    for real_images, real_labels in batches:
        noise = torch.randn(real_images.shape[0], NOISE_DIM)
        stats = train_step(g, d, opt_g, opt_d, real_images, noise, amp_dtype, labels=real_labels)
        ema.update(g)
        sums += torch.stack([stats[name] for name in STAT_NAMES])
    return sums


def _training(conditional: bool, ema_class: type):
    torch.manual_seed(0)
    classes = 10 if conditional else 0
    generator, discriminator = Generator(NOISE_DIM, classes), Discriminator(classes)
    optimizers = make_optimizer(generator, 2e-4, 0.5), make_optimizer(discriminator, 2e-4, 0.5)
    return generator, discriminator, *optimizers, ema_class(generator, 0.999)


def _data():
    rng = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (NUM_IMAGES, 1, 28, 28), dtype=torch.uint8, generator=rng)
    return images, torch.randint(0, 10, (NUM_IMAGES,), generator=rng)


def _tensors(*modules_and_optimizers) -> list[torch.Tensor]:
    """Every weight, buffer and optimizer moment, in a fixed order."""
    found = []
    for item in modules_and_optimizers:
        if isinstance(item, nn.Module):
            found += list(item.state_dict().values())
        else:
            found += [value for state in item.state_dict()["state"].values() for value in state.values()]
    return found


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_the_graphable_step_is_bitwise_the_step_before_it(conditional, amp_dtype):
    images, labels = _data()
    labels = labels if conditional else None
    g, d, opt_g, opt_d, ema = _training(conditional, GeneratorEMA)
    ref_g, ref_d, ref_opt_g, ref_opt_d, ref_ema = _training(conditional, ReferenceEMA)

    stepper = Stepper(g, d, opt_g, opt_d, images, NOISE_DIM, amp_dtype, ema, labels)
    for epoch in (1, 2):  # across epochs: the EMA's warm-up weight, the partial batch, fresh sums
        indices = shard_indices(NUM_IMAGES, 0, 1, epoch, seed=0)
        torch.manual_seed(epoch)
        sums = train_epoch(stepper, indices, 16).sums
        torch.manual_seed(epoch)
        ref_sums = reference_epoch(ref_g, ref_d, ref_opt_g, ref_opt_d, images, indices, 16, amp_dtype, ref_ema, labels)
        assert torch.equal(sums, ref_sums), epoch

    assert ema.updates == ref_ema.updates == 6
    new, old = _tensors(g, d, ema.module, opt_g, opt_d), _tensors(ref_g, ref_d, ref_ema.module, ref_opt_g, ref_opt_d)
    assert len(new) == len(old) and all(torch.equal(a, b) for a, b in zip(new, old))


def test_the_ema_weight_is_the_float32_of_the_python_weight_at_every_step():
    generator = Generator(NOISE_DIM)
    ema = GeneratorEMA(generator, 0.999)
    for n in (0, 1, 7, 8, 9, 10, 100, 6_993, 6_994, 10**6):  # the warm-up, its end (n = 6993), long after
        ema.updates = n
        averaged = next(ema.module.parameters())
        start, target = torch.zeros_like(averaged), torch.ones_like(averaged)
        with torch.no_grad():
            averaged.copy_(start)
            next(generator.parameters()).copy_(target)
        ema.update(generator)
        weight = 1.0 - min(0.999, (1 + n) / (10 + n))
        assert torch.equal(averaged, start.lerp(target, weight)), n
        assert ema.updates == n + 1


class PretendGraphStepper(Stepper):
    """A Stepper whose 'graphs' run on a CPU: warm-up is a plain step, a 'capture' records the static
    buffer's step to be rerun on each replay. What is left real is the bookkeeping under test: which
    steps are eager, when each shape is captured, and that a replay reads the batch it is handed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cuda_graphs = True  # the constructor refuses graphs off CUDA; the methods below need none
        self.log: list[tuple[str, int]] = []

    def _warm_up(self, batch_indices: torch.Tensor) -> None:
        self.log.append(("eager", batch_indices.shape[0]))
        self._step(batch_indices)

    def _record(self, static_indices: torch.Tensor):
        self.log.append(("capture", static_indices.shape[0]))

        def replay() -> None:
            self.log.append(("replay", static_indices.shape[0]))
            self._step(static_indices)

        return replay


def test_each_batch_shape_warms_up_then_is_captured_once_and_replayed_with_each_batch():
    images, _ = _data()
    g, d, opt_g, opt_d, ema = _training(False, GeneratorEMA)
    ref_g, ref_d, ref_opt_g, ref_opt_d, ref_ema = _training(False, GeneratorEMA)
    graphed = PretendGraphStepper(g, d, opt_g, opt_d, images, NOISE_DIM, ema=ema, warmup_steps=2)
    eager = Stepper(ref_g, ref_d, ref_opt_g, ref_opt_d, images, NOISE_DIM, ema=ref_ema)

    for epoch in (1, 2, 3):
        indices = shard_indices(NUM_IMAGES, 0, 1, epoch, seed=0)
        torch.manual_seed(epoch)
        sums = train_epoch(graphed, indices, 16).sums
        torch.manual_seed(epoch)
        assert torch.equal(sums, train_epoch(eager, indices, 16).sums), epoch  # each replay stepped on its own batch

    full = [entry for entry in graphed.log if entry[1] == 16]
    last = [entry for entry in graphed.log if entry[1] == 8]
    assert full == [("eager", 16)] * 2 + [("capture", 16)] + [("replay", 16)] * 4  # 2 full batches an epoch
    assert last == [("eager", 8), ("eager", 8), ("capture", 8), ("replay", 8)]  # the partial batch, one per epoch
    assert ema.updates == 9  # 3 epochs x 3 batches: a capture adds no step
    assert all(torch.equal(a, b) for a, b in zip(_tensors(g, d, ema.module), _tensors(ref_g, ref_d, ref_ema.module)))


def test_forgetting_the_graphs_warms_up_and_captures_again():
    images, _ = _data()
    g, d, opt_g, opt_d, ema = _training(False, GeneratorEMA)
    stepper = PretendGraphStepper(g, d, opt_g, opt_d, images, NOISE_DIM, warmup_steps=1)
    for _ in range(2):
        stepper.step(torch.arange(16))
    stepper.forget_graphs()  # what a resume or a rollback does after loading the optimizers' state
    stepper.step(torch.arange(16))
    stepper.step(torch.arange(16))
    assert [kind for kind, _ in stepper.log] == ["eager", "capture", "replay", "eager", "capture", "replay"]


def test_capturable_is_set_on_every_group_after_a_load_restored_the_saved_flag():
    optimizer = make_optimizer(Discriminator())
    saved = optimizer.state_dict()
    saved["param_groups"][0]["capturable"] = True  # as a graphed GPU run saves it
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["capturable"]  # load_state_dict restores it: a CPU step would refuse it
    set_capturable(optimizer, False)
    assert not any(group["capturable"] for group in optimizer.param_groups)
