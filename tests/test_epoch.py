"""One epoch of training as plain PyTorch (gan.epoch, gan.stepper), called without Ray or job/."""

import copy

import pytest
import torch

from gan.data import iterate_batches
from gan.epoch import STAT_NAMES, train_epoch
from gan.models import Discriminator, Generator
from gan.step import make_optimizer, train_step, GeneratorEMA
from gan.stepper import Stepper, graphs_wanted

NOISE_DIM = 8


def _networks(seed: int = 0, num_classes: int = 0):
    torch.manual_seed(seed)
    generator, discriminator = Generator(NOISE_DIM, num_classes), Discriminator(num_classes)
    return generator, discriminator, make_optimizer(generator), make_optimizer(discriminator)


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_an_epoch_steps_once_per_batch_and_returns_the_summed_stats():
    generator, discriminator, optimizer_g, optimizer_d = _networks()
    before = copy.deepcopy(generator.state_dict())
    ema = GeneratorEMA(generator, 0.999)
    steps_seen: list[int] = []
    stepper = Stepper(generator, discriminator, optimizer_g, optimizer_d, _images(20, 1), NOISE_DIM, ema=ema)

    totals = train_epoch(stepper, torch.arange(20), 8, on_step=steps_seen.append)

    assert totals.steps == 3 and steps_seen == [1, 2, 3]  # 8 + 8 + 4 images
    assert totals.sums.shape == (len(STAT_NAMES),) and torch.isfinite(totals.sums).all()
    d_real_prob, d_fake_prob = totals.sums[2:] / totals.steps
    assert 0 < d_real_prob < 1 and 0 < d_fake_prob < 1
    assert ema.updates == 3
    assert any(not torch.equal(before[name], value) for name, value in generator.state_dict().items())


def test_an_epoch_is_the_steps_of_train_step_in_order():
    """The same numbers as calling train_step on each batch by hand, from the same random stream."""
    images_u8 = _images(12, 2)
    indices = torch.tensor([5, 3, 11, 0, 7, 1, 9, 2, 4, 10, 6, 8])

    generator, discriminator, optimizer_g, optimizer_d = _networks()
    torch.manual_seed(3)
    totals = train_epoch(Stepper(generator, discriminator, optimizer_g, optimizer_d, images_u8, NOISE_DIM), indices, 4)

    by_hand_g, by_hand_d, by_hand_opt_g, by_hand_opt_d = _networks()
    torch.manual_seed(3)
    sums = torch.zeros(len(STAT_NAMES))
    for real in iterate_batches(images_u8, indices, 4):
        stats = train_step(
            by_hand_g, by_hand_d, by_hand_opt_g, by_hand_opt_d, real, torch.randn(real.shape[0], NOISE_DIM)
        )
        sums += torch.stack([stats[name] for name in STAT_NAMES])

    assert totals.steps == 3 and torch.equal(totals.sums, sums)
    for name, value in generator.state_dict().items():
        assert torch.equal(value, by_hand_g.state_dict()[name]), name


def test_each_epoch_returns_its_own_sums_not_the_previous_epochs_too():
    generator, discriminator, optimizer_g, optimizer_d = _networks()
    stepper = Stepper(generator, discriminator, optimizer_g, optimizer_d, _images(8, 4), NOISE_DIM)
    torch.manual_seed(1)
    train_epoch(stepper, torch.arange(8), 4)
    state = copy.deepcopy(
        (generator.state_dict(), discriminator.state_dict(), optimizer_g.state_dict(), optimizer_d.state_dict())
    )
    rng = torch.get_rng_state()
    second = train_epoch(stepper, torch.arange(8), 4)

    # The second epoch again, from the same state in a fresh stepper: the same sums.
    generator.load_state_dict(state[0]), discriminator.load_state_dict(state[1])
    optimizer_g.load_state_dict(state[2]), optimizer_d.load_state_dict(state[3])
    torch.set_rng_state(rng)
    again = train_epoch(
        Stepper(generator, discriminator, optimizer_g, optimizer_d, _images(8, 4), NOISE_DIM), torch.arange(8), 4
    )
    assert torch.equal(second.sums, again.sums)


def test_cuda_graphs_mode_is_eager_on_a_cpu_and_off_by_default_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not graphs_wanted("auto", cpu) and not graphs_wanted("off", cpu)
    assert graphs_wanted("on", cuda) and not graphs_wanted("off", cuda)
    assert not graphs_wanted("auto", cuda)  # until a GPU check has shown graphed == eager, and faster
    with pytest.raises(ValueError, match="CUDA device"):
        graphs_wanted("on", cpu)
