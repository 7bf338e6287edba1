"""The networks match the tutorial's Keras models."""

import torch

from gan.models import Discriminator, Generator, count_trainable_parameters


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
    assert slopes == {0.3}
