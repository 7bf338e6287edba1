"""The networks match the tutorial's Keras models."""

import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gan.models import (
    SUPPORTED_CHANNELS,
    SUPPORTED_RESOLUTIONS,
    ConditionalBatchNorm,
    Discriminator,
    FlattenLinear,
    Generator,
    LeakyReLUDropout,
    count_trainable_parameters,
    layout,
    parameter_digest,
)


def test_trainable_parameter_counts_equal_the_tutorials_keras_models():
    assert count_trainable_parameters(Generator(noise_dim=100)) == 2_305_472
    assert count_trainable_parameters(Discriminator()) == 212_865
    # num_classes=0 is the default, and is the same network.
    assert count_trainable_parameters(Generator(noise_dim=100, num_classes=0)) == 2_305_472
    assert count_trainable_parameters(Discriminator(num_classes=0)) == 212_865


def test_unconditional_generator_keeps_its_state_dict_keys_and_shapes():
    shapes = {key: tuple(value.shape) for key, value in Generator(noise_dim=100, num_classes=0).state_dict().items()}
    assert shapes["project.0.weight"] == (12544, 100)
    assert not any("label" in key for key in shapes)
    assert list(shapes) == [
        "project.0.weight", "project.1.weight", "project.1.bias", "project.1.running_mean", "project.1.running_var",
        "project.1.num_batches_tracked", "upsample.0.weight", "upsample.1.weight", "upsample.1.bias",
        "upsample.1.running_mean", "upsample.1.running_var", "upsample.1.num_batches_tracked", "upsample.3.weight",
        "upsample.4.weight", "upsample.4.bias", "upsample.4.running_mean", "upsample.4.running_var",
        "upsample.4.num_batches_tracked", "upsample.6.weight",
    ]  # fmt: skip


def test_a_checkpoint_written_before_conditioning_loads_strictly_into_the_unconditional_networks(tmp_path):
    # The committed fixture run (tests/fixtures/README.md) was written by older code, with --noise-dim 1.
    with tarfile.open(Path(__file__).parent / "fixtures" / "run-format2-stable.tar.xz") as archive:
        archive.extractall(tmp_path, filter="data")
    (state_file,) = tmp_path.glob("stable/checkpoint_*/state.pt")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    Generator(noise_dim=1).load_state_dict(state["generator"], strict=True)
    Generator(noise_dim=1, num_classes=0).load_state_dict(state["ema_generator"], strict=True)
    Discriminator(num_classes=0).load_state_dict(state["discriminator"], strict=True)


def test_conditional_networks_add_class_batch_norms_to_g_and_a_projection_to_d():
    extra_g = count_trainable_parameters(Generator(100, num_classes=10)) - 2_305_472
    extra_d = count_trainable_parameters(Discriminator(num_classes=10)) - 212_865
    # A gain and a shift per class for each BatchNorm's 12,544 + 128 + 64 features, in place of its one pair.
    assert extra_g == (10 - 1) * 2 * (12544 + 128 + 64) == 229_248
    assert extra_d == 10 * 6272 == 62_720  # one 6272-vector per class
    assert set(Discriminator(num_classes=10).state_dict()) - set(Discriminator().state_dict()) == {
        "label_projection.weight"
    }
    conditional_g = Generator(100, num_classes=10)
    assert [name for name, m in conditional_g.named_modules() if isinstance(m, ConditionalBatchNorm)] == [
        "project.1",
        "upsample.1",
        "upsample.4",
    ]
    assert conditional_g.project[0].in_features == 100  # the noise enters alone


def test_conditional_networks_keep_the_shapes_of_images_and_logits():
    labels = torch.tensor([0, 3, 9, 3, 1])
    images = Generator(16, num_classes=10)(torch.randn(5, 16), labels)
    assert images.shape == (5, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    logits = Discriminator(num_classes=10)(images, labels)
    assert logits.shape == (5, 1) and torch.isfinite(logits).all()


def test_conditional_batch_norm_scales_and_shifts_each_image_by_its_class():
    torch.manual_seed(0)
    norm = ConditionalBatchNorm(torch.nn.BatchNorm2d, 3, num_classes=4).eval()
    norm.norm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    norm.norm.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    torch.nn.init.normal_(norm.gain.weight)
    torch.nn.init.normal_(norm.shift.weight)
    x, labels = torch.randn(5, 3, 2, 2), torch.tensor([0, 3, 1, 3, 2])
    normalised = (x - norm.norm.running_mean.view(1, 3, 1, 1)) / torch.sqrt(
        norm.norm.running_var.view(1, 3, 1, 1) + 1e-3
    )
    expected = normalised * norm.gain.weight[labels].view(5, 3, 1, 1) + norm.shift.weight[labels].view(5, 3, 1, 1)
    torch.testing.assert_close(norm(x, labels), expected)


def test_a_fresh_conditional_batch_norm_is_the_plain_one_for_every_class():
    # Gains start at 1 and shifts at 0: training starts from the tutorial's G, the classes then pull apart.
    plain, conditional = (
        torch.nn.BatchNorm1d(6, eps=1e-3),
        ConditionalBatchNorm(torch.nn.BatchNorm1d, 6, num_classes=10),
    )
    x = torch.randn(8, 6)
    torch.testing.assert_close(conditional(x, torch.arange(8)), plain(x))


def test_conditional_generator_output_depends_on_the_label():
    generator = Generator(16, num_classes=10).eval()
    for module in generator.modules():
        if isinstance(module, ConditionalBatchNorm):
            torch.nn.init.normal_(module.shift.weight, std=0.1)  # as training moves them apart
    noise = torch.randn(1, 16).repeat(10, 1)  # the same noise for every class
    images = generator(noise, torch.arange(10))
    differences = (images[1:] - images[:1]).abs().flatten(1).amax(dim=1)
    assert (differences > 1e-3).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_projection_discriminator_adds_the_inner_product_of_the_label_embedding_and_the_features(channels_last):
    discriminator = (
        Discriminator(num_classes=10).eval().double()
    )  # eval: no dropout, so both paths see the same features
    images = torch.rand(6, 1, 28, 28, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 2, 7, 8, 9])
    features = discriminator.layers[:-1](images).flatten(1)  # φ(x): (N, 6272) in (C, H, W) order
    expected = discriminator.layers[-1](features) + (discriminator.label_projection(labels) * features).sum(
        1, keepdim=True
    )
    if channels_last:
        discriminator, images = (
            discriminator.to(memory_format=torch.channels_last),
            images.to(memory_format=torch.channels_last),
        )
    torch.testing.assert_close(discriminator(images, labels), expected)


def test_projection_discriminator_logit_depends_on_the_label():
    discriminator = Discriminator(num_classes=10).eval()
    images = (torch.rand(1, 1, 28, 28) * 2 - 1).repeat(10, 1, 1, 1)
    logits = discriminator(images, torch.arange(10)).squeeze(1)
    assert len(set(logits.tolist())) == 10  # a different logit for each class of the same image


def _network(kind: str, num_classes: int) -> torch.nn.Module:
    return Generator(16, num_classes=num_classes) if kind == "generator" else Discriminator(num_classes=num_classes)


@pytest.mark.parametrize("network", ["generator", "discriminator"])
def test_conditional_network_given_no_labels_and_unconditional_one_given_labels_say_so(network):
    inputs = torch.randn(2, 16) if network == "generator" else torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="class-conditional .10 classes.: pass labels"):
        _network(network, 10)(inputs)
    with pytest.raises(ValueError, match="unconditional .num_classes=0.: it takes no labels"):
        _network(network, 0)(inputs, torch.tensor([1, 2]))


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
    assert keys == {
        "layers.0.weight",
        "layers.0.bias",
        "layers.3.weight",
        "layers.3.bias",
        "layers.7.weight",
        "layers.7.bias",
    }


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


# The family of networks for users' own images (#30): every supported shape, 28x28x1 unchanged ---------

# parameter_digest(G(100), D()) right after torch.manual_seed(0), computed with the code before the family
# existed (commit aa2a7c0): equal digests mean the same modules, built in the same order from the same draws.
TUTORIAL_INITIAL_DIGEST = "1f599b8adc150c07"
TUTORIAL_CONDITIONAL_INITIAL_DIGEST = "1a70c3588840e77a"  # the same of G(100, 10) and D(10)

# (resolution, channels, num_classes) → trainable parameters of G (noise_dim 100) and D: docs quote them.
PARAMETER_COUNTS = {
    (28, 1, 0): (2_305_472, 212_865),
    (28, 1, 10): (2_534_720, 275_585),
    (32, 3, 0): (1_495_840, 1_033_345),
    (64, 3, 0): (1_521_504, 2_672_001),
    (128, 3, 0): (1_547_168, 4_310_657),
}


def test_the_tutorial_networks_start_from_the_same_weights_as_before_the_family():
    torch.manual_seed(0)
    assert parameter_digest(Generator(100), Discriminator()) == TUTORIAL_INITIAL_DIGEST
    torch.manual_seed(0)
    assert parameter_digest(Generator(100, 10), Discriminator(10)) == TUTORIAL_CONDITIONAL_INITIAL_DIGEST
    torch.manual_seed(0)
    explicit = Generator(100, 0, resolution=28, channels=1), Discriminator(0, resolution=28, channels=1)
    assert parameter_digest(*explicit) == TUTORIAL_INITIAL_DIGEST


@pytest.mark.parametrize("shape", list(PARAMETER_COUNTS), ids=lambda s: "{}x{}x{} classes={}".format(s[0], *s))
def test_parameter_counts_per_shape(shape):
    resolution, channels, num_classes = shape
    counts = (
        count_trainable_parameters(Generator(100, num_classes, resolution, channels)),
        count_trainable_parameters(Discriminator(num_classes, resolution, channels)),
    )
    print(f"{resolution}x{resolution}x{channels} num_classes={num_classes}: G {counts[0]:,} D {counts[1]:,}")
    assert counts == PARAMETER_COUNTS[shape]


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("channels", SUPPORTED_CHANNELS)
@pytest.mark.parametrize("resolution", SUPPORTED_RESOLUTIONS)
def test_every_shape_makes_images_of_its_shape_and_one_logit_each(resolution, channels, num_classes):
    generator = Generator(8, num_classes, resolution, channels)
    discriminator = Discriminator(num_classes, resolution, channels)
    labels = torch.tensor([0, 9]) if num_classes else None
    images = generator(torch.randn(2, 8), labels)
    assert images.shape == (2, channels, resolution, resolution) and images.abs().max() <= 1
    logits = discriminator(images.to(memory_format=torch.channels_last), labels)
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


def test_the_family_follows_its_rule():
    assert layout(28, 1) == layout()  # the tutorial's by default
    assert (layout(28).start_size, layout(28).g_widths, layout(28).d_widths) == (7, (128, 64, 1), (64, 128))
    assert (layout(32, 3).g_widths, layout(32, 3).d_widths) == ((128, 64, 32, 3), (64, 128, 256))
    assert layout(128, 3).g_widths == (128, 64, 32, 32, 32, 3)
    assert layout(128, 3).d_widths == (64, 128, 256, 256, 256)
    for resolution in SUPPORTED_RESOLUTIONS:
        plan = layout(resolution, 3)
        # G's stride-2 convolutions double s0 up to the resolution, and D's halve it back down.
        assert plan.start_size * 2 ** (len(plan.g_widths) - 1) == resolution
        assert len(plan.d_widths) == len(plan.g_widths) - 1
        assert plan.d_features == plan.d_widths[-1] * plan.start_size**2


def test_the_family_keeps_d_s_layer_pattern_and_the_projection_of_its_features():
    discriminator = Discriminator(10, resolution=64, channels=3)
    kinds = [type(layer).__name__ for layer in discriminator.layers]
    assert kinds == ["Conv2d", "LeakyReLUDropout", "Identity"] * 4 + ["Identity", "FlattenLinear"]
    assert (
        discriminator.label_projection.weight.shape == (10, 256 * 4 * 4) == (10, discriminator.layers[-1].in_features)
    )
    conditional_g = Generator(16, num_classes=10, resolution=64, channels=3)
    norms = [m for m in conditional_g.modules() if isinstance(m, ConditionalBatchNorm)]
    assert len(norms) == 1 + 4  # the projection's and each convolution's but the last


@pytest.mark.parametrize(
    "kwargs, named",
    [({"resolution": 48}, "resolution 48"), ({"channels": 2}, "channels 2"), ({"resolution": 256}, "resolution 256")],
)
def test_an_unsupported_shape_is_refused_naming_the_value(kwargs, named):
    for build in (lambda: Generator(8, **kwargs), lambda: Discriminator(**kwargs)):
        with pytest.raises(ValueError, match=named):
            build()
