"""Quality during training: every `--eval-every` epochs, rank 0 scores a fixed set of generated
images with the same metrics as `gan-job evaluate` (`gan.metrics.QualityEvaluator`).

The evaluator (the classifier, trained once per data set and cached, and the real test features)
is built on the first evaluation, so runs with `--eval-every 0` never pay for it. (`gan.metrics`
itself loads torchmetrics only when a metric is built, so importing it here costs nothing.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gan.datasets import Dataset
from gan.metrics import build_evaluator
from gan.sampling import labels_split_evenly, sample, seeded_noise
from job.config import TrainConfig

EVAL_SEED = 0  # classifier and reference subsets: fixed, so runs are comparable with each other
NOISE_SEED_OFFSET = 12_345  # the probe's noise is fixed per run and apart from the training noise


class QualityProbe:
    """Scores the generator on the same noise at every evaluation of a run."""

    def __init__(self, config: TrainConfig, dataset: Callable[[], Dataset], device: torch.device) -> None:
        self.config = config
        self.dataset = dataset  # the real images, asked for at the first evaluation (a streamed run decodes a sample)
        self.device = device
        self.noise = seeded_noise(config.eval_num, config.noise_dim, config.seed + NOISE_SEED_OFFSET)
        # A conditional G makes every class, as many of each (in class order): what `evaluate` measures too.
        classes = range(config.num_classes) if config.conditional and config.num_classes else None
        self.labels = labels_split_evenly(config.eval_num, classes) if classes else None
        self._evaluator = None

    def evaluate(self, generator: nn.Module) -> dict:
        """Metrics of `generator` (used in inference mode, then put back as it was); the images stay on the device,
        and the host waits once, at the end (`QualityEvaluator.compute`)."""
        if self._evaluator is None:  # may train the classifier: outside no_grad
            data = self.dataset()
            self._evaluator = build_evaluator(
                data.cache_key, data.train, data.test, data.num_classes, seed=EVAL_SEED, device=self.device
            )
        return self._evaluator.compute(sample(generator, self.noise, self.labels, on_device=True))
