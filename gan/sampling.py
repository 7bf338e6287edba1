"""Noise → images: the one sampling path of `generate`, `evaluate`, the training-time probe and
the sample grid, so that they can never disagree on how a generator is run.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK = 1024  # images per generator pass: bounds the memory of a large --num


def seeded_noise(num: int, noise_dim: int, seed: int) -> torch.Tensor:
    """`num` noise vectors from their own seeded stream (CPU), apart from the training noise."""
    return torch.randn(num, noise_dim, generator=torch.Generator().manual_seed(seed))


def sample(generator: nn.Module, noise: torch.Tensor) -> torch.Tensor:
    """Images (N, 1, 28, 28) as float32 on the CPU, in [-1, 1], from G in inference mode.

    Inference mode means BatchNorm's running statistics, not the chunk's: an image does not
    depend on which other images share its pass. G's mode is put back as it was.
    """
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            return torch.cat([generator(chunk.to(device)).float().cpu() for chunk in noise.split(CHUNK)])
    finally:
        generator.train(was_training)
