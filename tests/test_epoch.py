"""One epoch of training as plain PyTorch (gan.epoch), called without Ray or job/."""

import copy

import torch

from gan.data import iterate_batches
from gan.epoch import STAT_NAMES, train_epoch
from gan.models import Discriminator, Generator
from gan.step import GeneratorEMA, make_optimizer, train_step

NOISE_DIM = 8


def _networks(seed: int = 0):
    torch.manual_seed(seed)
    generator, discriminator = Generator(NOISE_DIM), Discriminator()
    return generator, discriminator, make_optimizer(generator), make_optimizer(discriminator)


def test_an_epoch_steps_once_per_batch_and_returns_the_summed_stats():
    generator, discriminator, optimizer_g, optimizer_d = _networks()
    before = copy.deepcopy(generator.state_dict())
    images_u8 = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ema = GeneratorEMA(generator, 0.999)
    steps_seen: list[int] = []

    totals = train_epoch(generator, discriminator, optimizer_g, optimizer_d, images_u8, torch.arange(20), 8, NOISE_DIM,
                         ema=ema, on_step=steps_seen.append)  # fmt: skip

    assert totals.steps == 3 and steps_seen == [1, 2, 3]  # 8 + 8 + 4 images
    assert totals.sums.shape == (len(STAT_NAMES),) and torch.isfinite(totals.sums).all()
    d_real_prob, d_fake_prob = totals.sums[2:] / totals.steps
    assert 0 < d_real_prob < 1 and 0 < d_fake_prob < 1
    assert ema.updates == 3
    assert any(not torch.equal(before[name], value) for name, value in generator.state_dict().items())


def test_an_epoch_is_the_steps_of_train_step_in_order():
    """The same numbers as calling train_step on each batch by hand, from the same random stream."""
    images_u8 = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    indices = torch.tensor([5, 3, 11, 0, 7, 1, 9, 2, 4, 10, 6, 8])

    generator, discriminator, optimizer_g, optimizer_d = _networks()
    torch.manual_seed(3)
    totals = train_epoch(generator, discriminator, optimizer_g, optimizer_d, images_u8, indices, 4, NOISE_DIM)

    by_hand_g, by_hand_d, by_hand_opt_g, by_hand_opt_d = _networks()
    torch.manual_seed(3)
    sums = torch.zeros(len(STAT_NAMES))
    for real in iterate_batches(images_u8, indices, 4):
        stats = train_step(by_hand_g, by_hand_d, by_hand_opt_g, by_hand_opt_d, real, torch.randn(real.shape[0], NOISE_DIM))
        sums += torch.stack([stats[name] for name in STAT_NAMES])

    assert totals.steps == 3 and torch.equal(totals.sums, sums)
    for name, value in generator.state_dict().items():
        assert torch.equal(value, by_hand_g.state_dict()[name]), name
