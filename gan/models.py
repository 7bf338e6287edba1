"""The generator and discriminator of the TensorFlow DCGAN tutorial, layer by layer.

Keras defaults the tutorial relies on are spelled out: LeakyReLU slope 0.3, BatchNorm momentum
0.99 (PyTorch's `momentum` is 1 - Keras's) and epsilon 1e-3, Glorot-uniform kernels, zero biases.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)  # channels, height, width
LEAKY_SLOPE = 0.3  # Keras LeakyReLU default
BN_MOMENTUM = 0.01  # Keras momentum 0.99
BN_EPS = 1e-3  # Keras default


def _batch_norm(kind: type[nn.modules.batchnorm._BatchNorm], features: int) -> nn.Module:
    return kind(features, eps=BN_EPS, momentum=BN_MOMENTUM)


def _keras_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, as Keras initialises Dense and Conv layers."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Dropout(nn.Dropout):
    """`nn.Dropout` with the same semantics (keep with probability 1 - p, scale by 1 / (1 - p)).

    Drawing the mask with `torch.rand` and multiplying is about twice as fast on CPU as
    `bernoulli_`, which made dropout a fifth of the training step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))


class Generator(nn.Module):
    """Noise (N, noise_dim) → images (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, noise_dim: int = 100) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.project = nn.Sequential(
            nn.Linear(noise_dim, 7 * 7 * 256, bias=False),  # (N, 12544)
            _batch_norm(nn.BatchNorm1d, 7 * 7 * 256),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        # Padding 2 with kernel 5 is Keras's "same"; output_padding 1 makes stride 2 double the size.
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 5, stride=1, padding=2, bias=False),  # (N, 128, 7, 7)
            _batch_norm(nn.BatchNorm2d, 128),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.ConvTranspose2d(128, 64, 5, stride=2, padding=2, output_padding=1, bias=False),  # (N, 64, 14, 14)
            _batch_norm(nn.BatchNorm2d, 64),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.ConvTranspose2d(64, 1, 5, stride=2, padding=2, output_padding=1, bias=False),  # (N, 1, 28, 28)
            nn.Tanh(),
        )
        self.apply(_keras_init)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        features = self.project(noise).view(-1, 256, 7, 7)
        return self.upsample(features)


class Discriminator(nn.Module):
    """Images (N, 1, 28, 28) → one logit per image (N, 1): real > 0 > fake."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 64, 5, stride=2, padding=2),  # (N, 64, 14, 14)
            nn.LeakyReLU(LEAKY_SLOPE),
            Dropout(0.3),
            nn.Conv2d(64, 128, 5, stride=2, padding=2),  # (N, 128, 7, 7)
            nn.LeakyReLU(LEAKY_SLOPE),
            Dropout(0.3),
            nn.Flatten(),  # (N, 6272)
            nn.Linear(7 * 7 * 128, 1),  # (N, 1)
        )
        self.apply(_keras_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def count_trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters, counted as Keras's `model.summary()` counts them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
