"""One training step: finite numbers, and each loss moves only its own network."""

import copy

import torch

from gan.losses import discriminator_loss, generator_loss
from gan.models import Discriminator, Generator
from gan.step import make_optimizer, train_step


def _setup(seed=0):
    torch.manual_seed(seed)
    return Generator(noise_dim=8), Discriminator(), torch.rand(6, 1, 28, 28) * 2 - 1, torch.randn(6, 8)


def test_step_returns_finite_zero_dim_tensors():
    generator, discriminator, real, noise = _setup()
    stats = train_step(generator, discriminator, make_optimizer(generator), make_optimizer(discriminator), real, noise)
    assert set(stats) == {"loss_d", "loss_g", "d_real_prob", "d_fake_prob"}
    for value in stats.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and torch.isfinite(value)
    assert 0 < stats["d_real_prob"] < 1 and 0 < stats["d_fake_prob"] < 1


def test_each_network_moves_by_the_gradient_of_its_own_loss_only():
    generator, discriminator, real, noise = _setup()
    g_ref, d_ref = copy.deepcopy(generator), copy.deepcopy(discriminator)

    # Reference gradients, computed separately: d loss_g / d G and d loss_d / d D.
    torch.manual_seed(123)  # the same dropout masks in both computations
    fake = g_ref(noise)
    real_logits, fake_logits = d_ref(real), d_ref(fake)
    grads_g = torch.autograd.grad(generator_loss(fake_logits), list(g_ref.parameters()), retain_graph=True)
    grads_d = torch.autograd.grad(discriminator_loss(real_logits, fake_logits), list(d_ref.parameters()))

    # SGD with lr 1 turns each parameter change into minus its gradient.
    before_g = [p.detach().clone() for p in generator.parameters()]
    before_d = [p.detach().clone() for p in discriminator.parameters()]
    torch.manual_seed(123)
    train_step(generator, discriminator, torch.optim.SGD(generator.parameters(), lr=1.0), torch.optim.SGD(discriminator.parameters(), lr=1.0), real, noise)
    for old, new, grad in zip(before_g, generator.parameters(), grads_g):
        torch.testing.assert_close(old - new.detach(), grad, rtol=1e-4, atol=1e-6)
    for old, new, grad in zip(before_d, discriminator.parameters(), grads_d):
        torch.testing.assert_close(old - new.detach(), grad, rtol=1e-4, atol=1e-6)


def test_generator_keeps_its_full_gradient_where_d_is_certain_the_images_are_fake():
    # Fake logits near -90: D's loss gradient there underflows float32, G's is about -1 per image.
    generator, discriminator, real, noise = _setup()
    with torch.no_grad():
        discriminator.layers[7].bias.fill_(-90.0)
    g_ref, d_ref = copy.deepcopy(generator), copy.deepcopy(discriminator)
    torch.manual_seed(5)  # the same dropout masks as train_step's, which scores the real batch first
    d_ref(real)
    fake_logits = d_ref(g_ref(noise))
    assert fake_logits.max() < -80
    grads_g = torch.autograd.grad(generator_loss(fake_logits), list(g_ref.parameters()))
    assert all(torch.isfinite(g).all() for g in grads_g) and any(g.abs().max() > 1e-4 for g in grads_g)

    before = [p.detach().clone() for p in generator.parameters()]
    torch.manual_seed(5)
    train_step(generator, discriminator, torch.optim.SGD(generator.parameters(), lr=1.0), torch.optim.SGD(discriminator.parameters(), lr=0.0), real, noise)
    for old, new, grad in zip(before, generator.parameters(), grads_g):
        torch.testing.assert_close(old - new.detach(), grad, rtol=1e-4, atol=1e-6)


def test_frozen_discriminator_optimizer_leaves_d_unchanged_while_g_trains():
    generator, discriminator, real, noise = _setup()
    before_g = [p.detach().clone() for p in generator.parameters()]
    before_d = [p.detach().clone() for p in discriminator.parameters()]
    frozen = torch.optim.SGD(discriminator.parameters(), lr=0.0)
    train_step(generator, discriminator, make_optimizer(generator), frozen, real, noise)
    assert all(torch.equal(a, b) for a, b in zip(before_d, discriminator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_g, generator.parameters()))


def test_adam_uses_keras_epsilon():
    optimizer = make_optimizer(Discriminator())
    assert optimizer.defaults["eps"] == 1e-7 and optimizer.defaults["lr"] == 1e-4


def test_bf16_autocast_step_gives_finite_float32_losses():
    generator, discriminator, real, noise = _setup()
    stats = train_step(generator, discriminator, make_optimizer(generator), make_optimizer(discriminator), real, noise, amp_dtype=torch.bfloat16)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in stats.values())
    assert all(p.dtype == torch.float32 for p in generator.parameters())  # weights stay float32


def test_generator_ema_moves_a_fraction_of_the_way_and_copies_batchnorm_statistics():
    from gan.step import GeneratorEMA

    generator = Generator(noise_dim=8)
    ema = GeneratorEMA(generator, decay=0.9)
    ema.updates = 1000  # past the warm-up: the decay is 0.9
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(1.0)
    generator(torch.randn(4, 8))  # moves BN running statistics
    ema.update(generator)
    for old, new in zip(before, ema.module.parameters()):
        torch.testing.assert_close(new, old + 0.1)
    for averaged, live in zip(ema.module.buffers(), generator.buffers()):
        assert torch.equal(averaged, live)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_generator_ema_warms_up_so_early_updates_follow_the_live_weights():
    from gan.step import GeneratorEMA

    generator = Generator(noise_dim=8)
    ema = GeneratorEMA(generator, decay=0.999)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(1.0)
    ema.update(generator)  # first update: decay min(0.999, 1/10) = 0.1
    first = next(ema.module.parameters())
    live = next(generator.parameters())
    torch.testing.assert_close(first, live - 0.1)
