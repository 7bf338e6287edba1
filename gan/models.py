"""The generator and discriminator of the TensorFlow DCGAN tutorial, layer by layer, and their family for
other square image shapes.

Keras defaults the tutorial relies on are spelled out: LeakyReLU slope 0.3, BatchNorm momentum
0.99 (PyTorch's `momentum` is 1 - Keras's) and epsilon 1e-3, Glorot-uniform kernels, zero biases.

The family (`layout`): G projects the noise to 256 x s0 x s0 (s0 = 7 for 28, else 4), keeps the
tutorial's stride-1 convolution to 128 channels, then doubles the side with stride-2 transposed
convolutions, halving the channels down to a floor of 32, until the resolution; the last one makes
the image's channels. D mirrors it with as many stride-2 convolutions (64, 128, then 256 at most),
back to s0 x s0. 28x28x1 is exactly the tutorial's pair, module for module:

| images    | G: channels x side after each convolution | D: channels x side after each convolution    |
|-----------|-------------------------------------------|----------------------------------------------|
| 28x28xC   | 128x7, 64x14, Cx28                        | 64x14, 128x7 (6,272 features)                |
| 32x32xC   | 128x4, 64x8, 32x16, Cx32                  | 64x16, 128x8, 256x4 (4,096)                  |
| 64x64xC   | 128x4, 64x8, 32x16, 32x32, Cx64           | 64x32, 128x16, 256x8, 256x4 (4,096)          |
| 128x128xC | 128x4, 64x8, 32x16, 32x32, 32x64, Cx128   | 64x64, 128x32, 256x16, 256x8, 256x4 (4,096)  |

Parameters (G with noise_dim 100, D; tests/test_model.py holds them): 28x28x1 2,305,472 and 212,865;
32x32x3 1,495,840 and 1,033,345; 64x64x3 1,521,504 and 2,672,001; 128x128x3 1,547,168 and 4,310,657.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.3  # Keras LeakyReLU default
BN_MOMENTUM = 0.01  # Keras momentum 0.99
BN_EPS = 1e-3  # Keras default
DROPOUT = 0.3  # the tutorial's, after each of D's convolutions

SUPPORTED_RESOLUTIONS = (28, 32, 64, 128)  # square sides the family builds: the tutorial's 28, and 4 · 2^k
SUPPORTED_CHANNELS = (1, 3)  # greyscale or RGB
PROJECTED_CHANNELS = 256  # G's dense projection: the tutorial's 7x7x256
G_FIRST_WIDTH = 128  # G's stride-1 convolution, as the tutorial's
G_MIN_WIDTH = 32  # G halves its channels with each doubling of the side, down to this
D_FIRST_WIDTH = 64  # D doubles its channels with each halving of the side, from this ...
D_MAX_WIDTH = 256  # ... up to this: the projection's width, so D's features stay 256 x 4 x 4 past 32


@dataclass(frozen=True)
class Layout:
    """The family's networks for one image shape: the size of G's projected map and each convolution's output."""

    resolution: int  # the images' side
    channels: int  # the images' channels
    start_size: int  # the side of G's projected map and of D's last features
    g_widths: tuple[int, ...]  # G's convolutions' outputs: the stride-1 one, then each stride-2 one (last: channels)
    d_widths: tuple[int, ...]  # D's stride-2 convolutions' outputs

    @property
    def d_features(self) -> int:
        """D's flattened features before its dense layer (6,272 for 28x28)."""
        return self.d_widths[-1] * self.start_size**2


def check_image_shape(resolution: int, channels: int) -> None:
    """Raise ValueError, naming the value, for an image shape the family does not build."""
    if resolution not in SUPPORTED_RESOLUTIONS:
        raise ValueError(
            f"resolution {resolution!r} is not supported; use one of {', '.join(map(str, SUPPORTED_RESOLUTIONS))}"
        )
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"channels {channels!r} is not supported; use 1 (greyscale) or 3 (RGB)")


def layout(resolution: int = 28, channels: int = 1) -> Layout:
    """The family's rule: G and D for square `resolution` x `resolution` images of `channels` channels."""
    check_image_shape(resolution, channels)
    start_size = 7 if resolution == 28 else 4  # the tutorial's 7x7; 4x4 for the powers of two, as DCGAN's
    doublings = round(math.log2(resolution // start_size))  # stride-2 convolutions: 2, 3, 4, 5
    g_hidden = tuple(max(G_FIRST_WIDTH >> step, G_MIN_WIDTH) for step in range(1, doublings))
    d_widths = tuple(min(D_FIRST_WIDTH << step, D_MAX_WIDTH) for step in range(doublings))
    return Layout(resolution, channels, start_size, (G_FIRST_WIDTH, *g_hidden, channels), d_widths)


def _batch_norm(kind: type[nn.modules.batchnorm._BatchNorm], features: int, num_classes: int = 0) -> nn.Module:
    """Keras's BatchNorm; with `num_classes` > 0, its class-conditional form."""
    if num_classes:
        return ConditionalBatchNorm(kind, features, num_classes)
    return kind(features, eps=BN_EPS, momentum=BN_MOMENTUM)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose gain and shift are those of each image's class (de Vries et al. 2017, Dumoulin et al. 2017).

    Normalised as Keras's BatchNorm (the batch's statistics in training, the running ones in
    inference), then scaled and shifted by the class's row of two embeddings, which start at 1 and
    0: at initialisation every class is the plain BatchNorm. The label thus modulates every layer
    of G while the noise keeps its own scale; joined to the noise instead, the label came to
    dominate G's input and G made one image per class (measured: docs/quality.md).
    """

    def __init__(self, kind: type[nn.modules.batchnorm._BatchNorm], features: int, num_classes: int) -> None:
        super().__init__()
        self.norm = kind(features, eps=BN_EPS, momentum=BN_MOMENTUM, affine=False)
        self.gain = nn.Embedding(num_classes, features)  # (N,) → (N, features)
        self.shift = nn.Embedding(num_classes, features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)  # per channel (per feature for 2-d input)
        normalised = self.norm(x)
        return normalised * self.gain(labels).view(shape).to(x.dtype) + self.shift(labels).view(shape).to(x.dtype)


def _keras_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, as Keras initialises Dense and Conv layers."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A 0/1 mask in x's dtype and layout keeping each element with probability ~1 - p, and its scale.

    Drawn as 16-bit integers, four per 64-bit random draw: on CPU that is about four times
    cheaper than `torch.rand`, which made dropout a fifth of the training step. The drop
    probability is quantised to 1/65536; the scale uses the quantised value so the mean is kept.
    """
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    bits = draws.view(torch.int16)[:n]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        bits = bits.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)  # same layout as x
    else:
        bits = bits.view(x.shape)
    threshold = round(p * 65536) - 32768  # P(bits < threshold) = p, to 1/65536
    # bool → uint8 → float is one fast conversion; bool → float directly is not vectorised on CPU.
    keep = (bits >= threshold).view(torch.uint8).to(x.dtype)
    return keep, 1.0 / (1.0 - (threshold + 32768) / 65536)


class _LeakyReLUDropoutFunction(torch.autograd.Function):
    """leaky_relu then dropout in one autograd node: saves the mask and output, not the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float, p: float) -> torch.Tensor:  # type: ignore[override]
        keep, scale = _keep_mask(x, p)
        y = F.leaky_relu(x, slope).mul_(keep).mul_(scale)
        ctx.save_for_backward(keep, y)
        ctx.slope, ctx.scale = slope, scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        keep, y = ctx.saved_tensors
        masked = (grad * keep).mul_(ctx.scale)
        # y has x's sign wherever the mask kept x, and where it did not the gradient is already 0.
        return torch.ops.aten.leaky_relu_backward(masked, y, ctx.slope, False), None, None


class LeakyReLUDropout(nn.Module):
    """`LeakyReLU(slope)` followed by `Dropout(p)`, with the same semantics, fused for speed.

    Dropout keeps each element with probability 1 - p and scales it by 1 / (1 - p) in training,
    and is the identity in eval mode, as `nn.Dropout`. One node instead of two halves the
    elementwise passes over D's activations, which the step runs through five times.
    """

    def __init__(self, slope: float, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.slope, self.p = slope, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return F.leaky_relu(x, self.slope)
        return _LeakyReLUDropoutFunction.apply(x, self.slope, self.p)

    def extra_repr(self) -> str:
        return f"slope={self.slope}, p={self.p}"


class FlattenLinear(nn.Linear):
    """Flatten (C, H, W) features, then Linear: the weight's columns are in (C, H, W) order.

    On channels_last input it reads the features in memory order, (H, W, C), and permutes the
    (small) weight to match instead of copying the (large) activations to NCHW.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            n, c, h, w = x.shape
            weight = self.weight.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(self.out_features, -1)
            return F.linear(x.permute(0, 2, 3, 1).reshape(n, -1), weight, self.bias)
        return super().forward(x.flatten(1))


def _check_labels(network: nn.Module, num_classes: int, labels: torch.Tensor | None) -> None:
    """Fail with a sentence when labels are missing for a conditional network, or given to an unconditional one."""
    name = type(network).__name__
    if num_classes and labels is None:
        raise ValueError(
            f"this {name} is class-conditional ({num_classes} classes): pass labels, a (N,) tensor of class indices"
        )
    if not num_classes and labels is not None:
        raise ValueError(
            f"this {name} is unconditional (num_classes=0): it takes no labels; build it with num_classes > 0 for them"
        )


class Generator(nn.Module):
    """Noise (N, noise_dim) → images (N, channels, resolution, resolution) in [-1, 1]; with `num_classes` > 0, also
    class labels (N,).

    The family's G for the shape (`layout`); 28x28x1 is exactly the tutorial's network. Conditional
    (`num_classes` > 0): each BatchNorm is a `ConditionalBatchNorm`, as the generators of SNGAN's
    projection-discriminator experiments (Miyato & Koyama, 2018) and BigGAN condition on the class;
    the noise enters alone.
    """

    def __init__(self, noise_dim: int = 100, num_classes: int = 0, resolution: int = 28, channels: int = 1) -> None:
        super().__init__()
        plan = layout(resolution, channels)
        self.noise_dim, self.num_classes = noise_dim, num_classes
        self.resolution, self.channels, self.start_size = resolution, channels, plan.start_size
        projected = PROJECTED_CHANNELS * plan.start_size**2
        self.project = nn.Sequential(
            nn.Linear(noise_dim, projected, bias=False),  # (N, 256·s0·s0): 12544 for 28
            _batch_norm(nn.BatchNorm1d, projected, num_classes),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        # Padding 2 with kernel 5 is Keras's "same"; output_padding 1 makes stride 2 double the size.
        layers: list[nn.Module] = []
        width_in = PROJECTED_CHANNELS
        for index, width in enumerate(plan.g_widths):
            if index == 0:  # (N, 128, s0, s0): the tutorial's stride-1 convolution
                layers.append(nn.ConvTranspose2d(width_in, width, 5, stride=1, padding=2, bias=False))
            else:  # (N, width, 2·side, 2·side): 28x28 goes 7 → 14 → 28, the others 4 → 8 → ... → resolution
                layers.append(nn.ConvTranspose2d(width_in, width, 5, stride=2, padding=2, output_padding=1, bias=False))
            if index < len(plan.g_widths) - 1:
                layers += [_batch_norm(nn.BatchNorm2d, width, num_classes), nn.LeakyReLU(LEAKY_SLOPE)]
            width_in = width
        layers.append(nn.Tanh())  # (N, channels, resolution, resolution) in [-1, 1]
        self.upsample = nn.Sequential(*layers)
        self.apply(_keras_init)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(self, self.num_classes, labels)
        shape = (-1, PROJECTED_CHANNELS, self.start_size, self.start_size)
        if labels is None:
            return self.upsample(self.project(noise).view(shape))
        features = _through(self.project, noise, labels).view(shape)
        return _through(self.upsample, features, labels)


def _through(layers: nn.Sequential, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`layers(x)`, with the labels handed to each ConditionalBatchNorm."""
    for layer in layers:
        x = layer(x, labels) if isinstance(layer, ConditionalBatchNorm) else layer(x)
    return x


class Discriminator(nn.Module):
    """Images (N, channels, resolution, resolution) → one logit per image (N, 1): real > 0 > fake; with
    `num_classes` > 0, also labels (N,).

    The family's D for the shape (`layout`); 28x28x1 is exactly the tutorial's network, with the same
    state_dict keys. Conditional (`num_classes` > 0): a projection discriminator (Miyato & Koyama,
    2018, "cGANs with Projection Discriminator"), D(x, y) = ψ(φ(x)) + ⟨embed(y), φ(x)⟩, where φ(x)
    are the flattened features before the dense layer ((N, 6272) for 28x28) and ψ is that layer.
    """

    def __init__(self, num_classes: int = 0, resolution: int = 28, channels: int = 1) -> None:
        super().__init__()
        plan = layout(resolution, channels)
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        layers: list[nn.Module] = []
        width_in = channels
        for width in plan.d_widths:
            layers += [
                nn.Conv2d(width_in, width, 5, stride=2, padding=2),  # (N, width, size/2, size/2): 28 → 14 → 7
                LeakyReLUDropout(LEAKY_SLOPE, DROPOUT),
                nn.Identity(),  # placeholders keep the layer indices, so checkpoints keep their keys
            ]
            width_in = width
        layers += [
            nn.Identity(),
            FlattenLinear(plan.d_features, 1),  # (N, 6272) → (N, 1) for 28x28: ψ
        ]
        self.layers = nn.Sequential(*layers)
        self.apply(_keras_init)
        if num_classes:
            self.label_projection = nn.Embedding(num_classes, plan.d_features)  # (N,) → (N, features)
            # Glorot-uniform, as the projection paper's code initialises it: ⟨embed(y), φ(x)⟩ then
            # starts at the scale of ψ(φ(x)), whose weight has the same fan.
            nn.init.xavier_uniform_(self.label_projection.weight)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(self, self.num_classes, labels)
        if labels is None:
            return self.layers(images)
        features = self.layers[:-1](images)  # φ(x): (N, 128, 7, 7) for 28x28, in the input's memory format
        # ⟨embed(y), φ(x)⟩, with the embedding viewed as (C, H, W) to match FlattenLinear's order;
        # multiplying in 4-d spares flattening channels_last features into a copy.
        projection = (features * self.label_projection(labels).view(features.shape)).sum(dim=(1, 2, 3))  # (N,)
        return self.layers[-1](features) + projection.unsqueeze(1)  # (N, 1)


def count_trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters, counted as Keras's `model.summary()` counts them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_digest(*models: nn.Module) -> str:
    """A hash of the models' parameters (pass plain modules, not DDP wrappers): equal on all ranks when DDP keeps
    them in sync, and the same for a checkpoint's weights loaded anew."""
    digest = hashlib.sha256()
    for model in models:
        for name, param in model.named_parameters():
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
