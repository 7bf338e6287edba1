"""One training step: finite numbers, and each loss moves only its own network."""

import copy

import pytest
import torch

from gan.losses import discriminator_loss, generator_loss
from gan.models import Discriminator, Generator
import gan.step
from gan.step import amp_dtype_for, make_optimizer, train_step


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
    train_step(
        generator,
        discriminator,
        torch.optim.SGD(generator.parameters(), lr=1.0),
        torch.optim.SGD(discriminator.parameters(), lr=1.0),
        real,
        noise,
    )
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
    train_step(
        generator,
        discriminator,
        torch.optim.SGD(generator.parameters(), lr=1.0),
        torch.optim.SGD(discriminator.parameters(), lr=0.0),
        real,
        noise,
    )
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
    stats = train_step(
        generator,
        discriminator,
        make_optimizer(generator),
        make_optimizer(discriminator),
        real,
        noise,
        amp_dtype=torch.bfloat16,
    )
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in stats.values())
    assert all(p.dtype == torch.float32 for p in generator.parameters())  # weights stay float32


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_a_cpu_that_does_bf16_natively(monkeypatch, native):
    # On CUDA `auto` is fp32 whatever the GPU: measured faster for these launch-bound networks.
    monkeypatch.setattr(gan.step, "bf16_is_native", lambda device: native)
    assert amp_dtype_for("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert amp_dtype_for("auto", torch.device("cuda")) is None
    assert (
        amp_dtype_for("bf16", torch.device("cuda")) == torch.bfloat16
        and amp_dtype_for("fp32", torch.device("cpu")) is None
    )


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


def _conditional_setup(seed=0):
    torch.manual_seed(seed)
    generator, discriminator = Generator(noise_dim=8, num_classes=10), Discriminator(num_classes=10)
    return (
        generator,
        discriminator,
        torch.rand(6, 1, 28, 28) * 2 - 1,
        torch.tensor([0, 1, 2, 3, 4, 9]),
        torch.randn(6, 8),
    )


def test_conditional_step_updates_every_parameter_of_both_networks():
    # Every parameter moves, embeddings included: none is unused, as DDP requires by default.
    generator, discriminator, real, labels, noise = _conditional_setup()
    named = [*generator.named_parameters(prefix="g"), *discriminator.named_parameters(prefix="d")]
    before = {name: p.detach().clone() for name, p in named}
    stats = train_step(
        generator, discriminator, make_optimizer(generator), make_optimizer(discriminator), real, noise, None, labels
    )
    after = dict(named)
    assert (
        "g.upsample.4.gain.weight" in after
        and "g.project.1.shift.weight" in after
        and "d.label_projection.weight" in after
    )
    assert [name for name, old in before.items() if torch.equal(old, after[name])] == []
    assert all(v.dim() == 0 and torch.isfinite(v) for v in stats.values())


def test_conditional_step_moves_each_network_by_the_gradient_of_its_own_loss_only():
    # The fake images are made for labels drawn uniformly at random, and D scores each with its label.
    generator, discriminator, real, labels, noise = _conditional_setup()
    g_ref, d_ref = copy.deepcopy(generator), copy.deepcopy(discriminator)

    torch.manual_seed(123)  # the same fake labels and dropout masks in both computations
    fake_labels = torch.randint(10, (noise.shape[0],))
    fake = g_ref(noise, fake_labels)
    real_logits, fake_logits = d_ref(real, labels), d_ref(fake, fake_labels)
    grads_g = torch.autograd.grad(generator_loss(fake_logits), list(g_ref.parameters()), retain_graph=True)
    grads_d = torch.autograd.grad(discriminator_loss(real_logits, fake_logits), list(d_ref.parameters()))

    before_g = [p.detach().clone() for p in generator.parameters()]
    before_d = [p.detach().clone() for p in discriminator.parameters()]
    torch.manual_seed(123)
    sgd_g, sgd_d = torch.optim.SGD(generator.parameters(), lr=1.0), torch.optim.SGD(discriminator.parameters(), lr=1.0)
    train_step(generator, discriminator, sgd_g, sgd_d, real, noise, labels=labels)
    for old, new, grad in zip(before_g, generator.parameters(), grads_g):
        torch.testing.assert_close(old - new.detach(), grad, rtol=1e-4, atol=1e-6)
    for old, new, grad in zip(before_d, discriminator.parameters(), grads_d):
        torch.testing.assert_close(old - new.detach(), grad, rtol=1e-4, atol=1e-6)


def test_conditional_step_draws_fake_labels_for_as_many_images_as_noise_vectors():
    generator, discriminator, real, labels, _ = _conditional_setup()
    noise = torch.randn(4, 8)  # fewer fakes than real images, as the last batch of a shard may have
    stats = train_step(
        generator, discriminator, make_optimizer(generator), make_optimizer(discriminator), real, noise, labels=labels
    )
    assert torch.isfinite(stats["loss_g"])


def test_conditional_bf16_autocast_step_gives_finite_float32_losses():
    generator, discriminator, real, labels, noise = _conditional_setup()
    optimizer_g, optimizer_d = make_optimizer(generator), make_optimizer(discriminator)
    stats = train_step(generator, discriminator, optimizer_g, optimizer_d, real, noise, torch.bfloat16, labels)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in stats.values())


def test_step_with_labels_unwraps_a_wrapped_generator_for_its_number_of_classes():
    # DDP keeps the network in `.module`; the fake labels' range is read through it.
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    generator, discriminator, real, labels, noise = _conditional_setup()
    wrapped_g, wrapped_d = Wrapper(generator), Wrapper(discriminator)
    stats = train_step(
        wrapped_g, wrapped_d, make_optimizer(generator), make_optimizer(discriminator), real, noise, labels=labels
    )
    assert torch.isfinite(stats["loss_d"])
