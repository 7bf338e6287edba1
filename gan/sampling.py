"""Noise → images: the one sampling path of `generate`, `evaluate`, the training-time probe and
the sample grid, so that they can never disagree on how a generator is run.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

CHUNK = 1024  # images per generator pass: bounds the memory of a large --num


def seeded_noise(num: int, noise_dim: int, seed: int) -> torch.Tensor:
    """`num` noise vectors from their own seeded stream (CPU), apart from the training noise."""
    return torch.randn(num, noise_dim, generator=torch.Generator().manual_seed(seed))


def sample(
    generator: nn.Module, noise: torch.Tensor, labels: torch.Tensor | None = None, on_device: bool = False
) -> torch.Tensor:
    """Images (N, 1, 28, 28) as float32 on the CPU (`on_device`: on G's, without waiting), in [-1, 1], from G in
    inference mode.

    Inference mode means BatchNorm's running statistics, not the chunk's: an image does not
    depend on which other images share its pass. G's mode is put back as it was. `labels` (N,)
    are the classes a conditional G makes, one per noise vector; None for an unconditional G.
    """
    device = next(generator.parameters()).device
    to = device if on_device else torch.device("cpu")
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            if labels is None:
                return torch.cat([generator(chunk.to(device)).float().to(to) for chunk in noise.split(CHUNK)])
            if labels.shape != noise.shape[:1]:
                raise ValueError(
                    f"labels of shape {tuple(labels.shape)} for {noise.shape[0]} noise vectors; "
                    "pass one label per vector"
                )
            return torch.cat(
                [
                    generator(chunk.to(device), labels=chunk_labels.to(device, torch.long)).float().to(to)
                    for chunk, chunk_labels in zip(noise.split(CHUNK), labels.split(CHUNK))
                ]
            )
    finally:
        generator.train(was_training)


def labels_split_evenly(num: int, classes: Sequence[int]) -> torch.Tensor:
    """Labels (num,) int64 for `num` images split evenly over `classes`, in the order listed.

    `labels_split_evenly(10, [3, 5])` is [3]*5 + [5]*5. When `num` does not divide, the first
    `num % len(classes)` classes get one image more, so the counts differ by at most one.
    """
    if not classes:
        raise ValueError("no classes to split the images over; list at least one")
    per_class, extra = divmod(num, len(classes))
    counts = torch.tensor([per_class + (i < extra) for i in range(len(classes))])
    return torch.tensor(list(classes), dtype=torch.long).repeat_interleave(counts)


def class_grid_inputs(num_classes: int, per_class: int, noise_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and labels for a per-class sample grid: row c holds `per_class` images of class c.

    Row-major, `num_classes * per_class` images, for `image_grid_png(..., columns=per_class)` (10
    rows x 10 columns for Fashion-MNIST with per_class=10). Each column reuses one noise vector in
    every row, so reading down a column shows what the label alone changes.
    """
    noise = seeded_noise(per_class, noise_dim, seed).repeat(num_classes, 1)  # (num_classes * per_class, noise_dim)
    labels = torch.arange(num_classes).repeat_interleave(per_class)  # (num_classes * per_class,): 0…0, 1…1, …
    return noise, labels


def conditional_inputs(num: int, noise_dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (num, noise_dim) and labels (num,) with the classes drawn uniformly, as many of each.

    What a conditional G is measured on (FID, class coverage, label accuracy, CAS): the noise is
    `seeded_noise(num, noise_dim, seed)`, the same an unconditional G gets, and the labels are
    `labels_split_evenly(num, range(num_classes))`, in class order (0…0, 1…1, …). The order does
    not change a metric of the whole set; take a subset with `torch.randperm`, not a prefix.
    """
    return seeded_noise(num, noise_dim, seed), labels_split_evenly(num, range(num_classes))
