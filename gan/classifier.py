"""A small CNN classifier for 28x28 grayscale images, whose penultimate layer is the feature space
of the quality metrics (a stand-in for Inception that knows these data sets and runs on a CPU).

It is trained once per data set and seed on the real training split and cached in the user cache;
the same data, seed and recipe give the same weights, so metrics stay comparable between runs.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gan.data import cache_root, file_lock, to_unit_range

NUM_CLASSES = 10
NUM_FEATURES = 128  # width of the feature layer; FID's covariance is NUM_FEATURES x NUM_FEATURES
RECIPE_VERSION = 2  # bump when the architecture or training recipe changes: cached weights are retrained
DEFAULT_EPOCHS = 2  # ~90 % test accuracy on Fashion-MNIST in ~25 s (one CPU thread)
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
PREDICT_BATCH = 2048  # images per forward pass at inference, to bound memory


class Classifier(nn.Module):
    """Images (N, 1, 28, 28) in [-1, 1] → class logits (N, 10); `features` gives the (N, 128) layer below."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),  # (N, 16, 28, 28)
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 16, 14, 14)
            nn.Conv2d(16, 32, 3, padding=1, bias=False),  # (N, 32, 14, 14)
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 32, 7, 7)
            nn.Flatten(),  # (N, 1568)
            nn.Linear(32 * 7 * 7, NUM_FEATURES),  # (N, 128)
            nn.ReLU(),
        )
        self.head = nn.Linear(NUM_FEATURES, NUM_CLASSES)  # (N, 10)
        self.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on a CPU

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.contiguous(memory_format=torch.channels_last))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class FeatureExtractor(nn.Module):
    """The classifier's feature layer as torchmetrics' FID wants a custom `feature` module.

    It exposes `num_features` (so torchmetrics does not probe it with a dummy uint8 image), takes
    float images in [-1, 1] as they are, and never leaves inference mode.
    """

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = NUM_FEATURES

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # BatchNorm must keep its running statistics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())


@dataclass(frozen=True)
class TrainedClassifier:
    """A classifier in inference mode with what identifies it: weights digest, data, seed, accuracy."""

    model: Classifier
    digest: str  # sha256 prefix of the weights: equal digests mean comparable metrics
    data_fingerprint: str  # of the training images
    seed: int
    epochs: int
    test_accuracy: float | None  # on the real test split, when it was measured

    def describe(self) -> dict:
        """Plain values for a JSON report."""
        return {
            "digest": self.digest,
            "data_fingerprint": self.data_fingerprint,
            "seed": self.seed,
            "epochs": self.epochs,
            "recipe_version": RECIPE_VERSION,
            "test_accuracy": self.test_accuracy,
        }


def train_classifier(
    images_u8: torch.Tensor,  # (N, 1, 28, 28) uint8 training images
    labels: torch.Tensor,  # (N,) class indices 0..9
    seed: int = 0,  # seeds the weights and the batch order; same seed and data, same weights
    epochs: int = DEFAULT_EPOCHS,  # passes over the data
    batch_size: int = BATCH_SIZE,  # images per Adam step
    lr: float = LEARNING_RATE,  # Adam learning rate
) -> Classifier:
    """Train a fresh classifier with Adam on the CPU; returns it in inference mode.

    The global RNG and torch's thread count are left as they were.
    """
    # One thread: the weights then do not depend on the machine's core count (reductions split by
    # thread change the last bits), so runs evaluated on different machines stay comparable; and
    # small-batch steps gain little from threads but suffer badly when the cores are oversubscribed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # A private RNG stream: this may run inside a training worker whose random stream must not move.
        with torch.random.fork_rng(devices=[]):
            return _train(images_u8, labels, seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(
    images_u8: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int, batch_size: int, lr: float
) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    labels = labels.long()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images_u8.shape[0], generator=order_rng)
        for start in range(0, order.shape[0], batch_size):
            batch = order[start : start + batch_size]
            if batch.shape[0] < 2:
                continue  # BatchNorm cannot train on a single image
            loss = nn.functional.cross_entropy(model(to_unit_range(images_u8[batch])), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor) -> torch.Tensor:
    """Class indices (N,) for float images in [-1, 1], in chunks of PREDICT_BATCH."""
    device = next(model.parameters()).device
    return torch.cat([model(chunk.to(device)).argmax(dim=1).cpu() for chunk in images.split(PREDICT_BATCH)])


def accuracy(model: Classifier, images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images_u8` (uint8) that `model` labels correctly."""
    predicted = predict(model, to_unit_range(images_u8))
    return float((predicted == labels.long()).float().mean())


def weights_digest(model: nn.Module) -> str:
    """A short sha256 of the state dict's tensors, in key order."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(dataset: str, fingerprint: str, seed: int) -> Path:
    """Where the classifier for one data set (by the fingerprint of its training images) and seed is cached."""
    safe_fingerprint = fingerprint.replace(":", "-")  # "60000:abc…" → a portable file name
    return cache_root() / "classifiers" / f"{dataset}-{safe_fingerprint}-seed{seed}.pt"


def classifier_to_bytes(trained: TrainedClassifier) -> bytes:
    """The cache file's content: the state dict and its recipe, loadable with `weights_only=True`."""
    stored = {**trained.describe(), "state_dict": trained.model.state_dict()}
    del stored["digest"]  # recomputed from the weights on load, so it cannot lie
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    return buffer.getvalue()


def classifier_from_bytes(raw: bytes) -> TrainedClassifier | None:
    """Parse `classifier_to_bytes`' output; None when it is damaged or from another recipe version."""
    try:
        stored = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        if stored.get("recipe_version") != RECIPE_VERSION:
            return None
        model = Classifier()
        model.load_state_dict(stored["state_dict"])
        model.eval().requires_grad_(False)
        return TrainedClassifier(
            model,
            weights_digest(model),
            stored["data_fingerprint"],
            stored["seed"],
            stored["epochs"],
            stored.get("test_accuracy"),
        )
    except Exception:  # a damaged or foreign file fails in many ways; all mean "retrain"
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def load_or_train_classifier(
    dataset: str,  # data set name, part of the cache file name
    train_images_u8: torch.Tensor,  # (N, 1, 28, 28) uint8, the real training split
    train_labels: torch.Tensor,  # (N,)
    fingerprint: str,  # of the training images (`gan.data.ImageSet.fingerprint`)
    seed: int = 0,  # classifier seed
    epochs: int = DEFAULT_EPOCHS,  # passes over the training split when it has to be trained
    test_images_u8: torch.Tensor | None = None,  # to record test accuracy after training; None = skip
    test_labels: torch.Tensor | None = None,
) -> TrainedClassifier:
    """The cached classifier for this data and seed, trained (once per node, under a lock) when absent."""
    path = cache_path(dataset, fingerprint, seed)
    with file_lock(path.with_suffix(".lock")):
        if path.is_file():
            cached = classifier_from_bytes(path.read_bytes())
            if (
                cached is not None
                and cached.data_fingerprint == fingerprint
                and cached.seed == seed
                and cached.epochs == epochs
            ):
                return cached
        model = train_classifier(train_images_u8, train_labels, seed=seed, epochs=epochs)
        test_accuracy = None
        if test_images_u8 is not None and test_labels is not None:
            test_accuracy = round(accuracy(model, test_images_u8, test_labels), 4)
        trained = TrainedClassifier(model, weights_digest(model), fingerprint, seed, epochs, test_accuracy)
        _write_atomically(path, classifier_to_bytes(trained))
        return trained
