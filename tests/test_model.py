"""The networks match the tutorial's Keras models."""

import pytest
import torch
import torch.nn.functional as F

from gan.models import Discriminator, FlattenLinear, Generator, LeakyReLUDropout, count_trainable_parameters


def test_trainable_parameter_counts_equal_the_tutorials_keras_models():
    assert count_trainable_parameters(Generator(noise_dim=100)) == 2_305_472
    assert count_trainable_parameters(Discriminator()) == 212_865


def test_generator_maps_noise_to_28x28_images_in_tanh_range():
    images = Generator(noise_dim=100)(torch.randn(5, 100) * 10)
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1


def test_discriminator_gives_one_logit_per_image():
    logits = Discriminator()(torch.rand(7, 1, 28, 28) * 2 - 1)
    assert logits.shape == (7, 1)
    assert torch.isfinite(logits).all()


def test_keras_defaults_are_used_for_batchnorm_and_leaky_relu():
    generator = Generator()
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)
    slopes = {m.negative_slope for m in generator.modules() if isinstance(m, torch.nn.LeakyReLU)}
    slopes |= {m.slope for m in Discriminator().modules() if isinstance(m, LeakyReLUDropout)}
    assert slopes == {0.3}


def test_discriminator_keeps_the_state_dict_keys_of_its_sequential_layout():
    keys = set(Discriminator().state_dict())
    assert keys == {"layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias", "layers.7.weight", "layers.7.bias"}


def test_leaky_relu_dropout_keeps_seventy_percent_scaled_to_preserve_the_mean():
    layer = LeakyReLUDropout(0.3, 0.3)
    out = layer(torch.ones(400_000))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    assert abs(out.mean().item() - 1.0) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.7), rtol=1e-5, atol=0)


def test_leaky_relu_dropout_in_eval_mode_is_leaky_relu_alone():
    x = torch.randn(1000)
    torch.testing.assert_close(LeakyReLUDropout(0.3, 0.3).eval()(x), F.leaky_relu(x, 0.3))


@pytest.mark.parametrize("channels_last", [False, True])
def test_leaky_relu_dropout_equals_leaky_relu_then_the_same_mask(channels_last):
    x = torch.randn(16, 8, 7, 7, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = LeakyReLUDropout(0.3, 0.3)(x)
    kept = (y != 0).detach()
    assert 0.6 < kept.double().mean().item() < 0.8
    reference = F.leaky_relu(x, 0.3) * kept / (1 - 19661 / 65536)  # p quantised to 1/65536
    torch.testing.assert_close(y, reference)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    (expected,) = torch.autograd.grad(reference, x, upstream)
    torch.testing.assert_close(grad, expected)


def test_leaky_relu_dropout_masks_differ_between_calls_and_follow_the_seed():
    layer, x = LeakyReLUDropout(0.3, 0.3), torch.ones(10_000)
    torch.manual_seed(3)
    first, second = layer(x), layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first) and not torch.equal(first, second)


def test_flatten_linear_on_channels_last_equals_flatten_then_linear():
    head = FlattenLinear(4 * 3 * 3, 2).double()
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    fast_input = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    plain_input = x.clone().requires_grad_()
    fast, plain = head(fast_input), head(plain_input)
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(plain, F.linear(x.flatten(1), head.weight, head.bias))
    fast_grads = torch.autograd.grad(fast.sum(), [fast_input, head.weight])
    plain_grads = torch.autograd.grad(plain.sum(), [plain_input, head.weight])
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b)
