"""A small CNN classifier of the training images, whose penultimate layer is the feature space of the
quality metrics (a stand-in for Inception that knows these data sets and runs on a CPU).

It is trained once per data set and seed on the real training split and cached in the user cache;
the same data, seed and recipe give the same weights, so metrics stay comparable between runs.
Labelled data train it on their classes. Unlabelled data have none, so it learns a pretext task
instead, rotation prediction (RotNet: Gidaris et al., "Unsupervised Representation Learning by
Predicting Image Rotations", ICLR 2018): which of 0, 90, 180, 270 degrees an image was turned by.
To tell them apart it must see what is upright in these images, so its feature layer on unrotated
images is a feature space of the data all the same. For 28x28x1 labelled data the network, recipe
and cache file are those of before the other shapes, and give the same weights.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from gan.data import cache_root, file_lock, to_unit_range
from gan.models import check_image_shape

NUM_CLASSES = 10
NUM_FEATURES = 128  # width of the feature layer; FID's covariance is NUM_FEATURES x NUM_FEATURES
RECIPE_VERSION = 2  # bump when the architecture or training recipe changes: cached weights are retrained
DEFAULT_EPOCHS = 2  # ~90 % test accuracy on Fashion-MNIST in ~25 s (one CPU thread)
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
PREDICT_BATCH = 2048  # images per forward pass at inference, to bound memory
PRETEXT_LABELS = "labels"  # trained on the data's class labels
PRETEXT_ROTATION = "rotation"  # unlabelled data: trained to tell the four rotations of each image apart
PRETEXTS = (PRETEXT_LABELS, PRETEXT_ROTATION)
ROTATIONS = 4  # 0, 90, 180 and 270 degrees: the rotation task's classes
MAX_FEATURE_SIDE = 8  # conv + pool stages halve the map until its side is at most this
STAGE_WIDTHS = (16, 32, 64)  # the stages' channels; further stages keep the last


def stage_widths(resolution: int) -> tuple[int, ...]:
    """The channels of each conv + pool stage: 28 → (16, 32) (7x7), 32 → (16, 32), 64 → (16, 32, 64),
    128 → (16, 32, 64, 64), each ending at 8x8."""
    widths: list[int] = []
    side = resolution
    while side > MAX_FEATURE_SIDE:
        widths.append(STAGE_WIDTHS[min(len(widths), len(STAGE_WIDTHS) - 1)])
        side //= 2
    return tuple(widths)


class Classifier(nn.Module):
    """Images (N, channels, resolution, resolution) in [-1, 1] → class logits (N, num_classes); `features` gives
    the (N, 128) layer below.

    28x28x1 with 10 classes is the network this project began with: two stages to 32x7x7. Other
    shapes get as many stages as bring the map to 8x8 (`stage_widths`).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, resolution: int = 28, channels: int = 1) -> None:
        super().__init__()
        check_image_shape(resolution, channels)
        self.num_classes, self.resolution, self.channels = num_classes, resolution, channels
        layers: list[nn.Module] = []
        width_in, side = channels, resolution
        for width in stage_widths(resolution):
            layers += [
                nn.Conv2d(width_in, width, 3, padding=1, bias=False),  # (N, width, side, side): (N, 16, 28, 28) first
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),  # (N, width, side/2, side/2): 28 → 14 → 7
            ]
            width_in, side = width, side // 2
        layers += [
            nn.Flatten(),  # (N, width·side·side): 1568 for 28x28
            nn.Linear(width_in * side * side, NUM_FEATURES),  # (N, 128)
            nn.ReLU(),
        ]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(NUM_FEATURES, num_classes)  # (N, num_classes)
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
    """A classifier in inference mode with what identifies it: weights digest, data, seed, accuracy, pretext."""

    model: Classifier
    digest: str  # sha256 prefix of the weights: equal digests mean comparable metrics
    data_fingerprint: str  # of the training images
    seed: int
    epochs: int
    test_accuracy: float | None  # on the real test split (its rotations, for PRETEXT_ROTATION), when measured
    pretext: str = PRETEXT_LABELS  # what it was trained to tell apart: the data's classes, or rotations

    def describe(self) -> dict:
        """Plain values for a JSON report."""
        return {
            "digest": self.digest,
            "data_fingerprint": self.data_fingerprint,
            "seed": self.seed,
            "epochs": self.epochs,
            "recipe_version": RECIPE_VERSION,
            "test_accuracy": self.test_accuracy,
            "pretext": self.pretext,
            "num_classes": self.model.num_classes,
            "resolution": self.model.resolution,
            "channels": self.model.channels,
        }


def train_classifier(
    images_u8: torch.Tensor,  # (N, C, R, R) uint8 training images
    labels: torch.Tensor | None,  # (N,) class indices 0..num_classes-1; None = unlabelled: the rotation task
    seed: int = 0,  # seeds the weights and the batch order; same seed and data, same weights
    epochs: int = DEFAULT_EPOCHS,  # passes over the data (each image in its four rotations, without labels)
    batch_size: int = BATCH_SIZE,  # images per Adam step (rotated copies included)
    lr: float = LEARNING_RATE,  # Adam learning rate
    num_classes: int = NUM_CLASSES,  # the head's classes with labels; without, it has ROTATIONS
) -> Classifier:
    """Train a fresh classifier with Adam on the CPU; returns it in inference mode.

    The global RNG and torch's thread count are left as they were.
    """
    if labels is not None and labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for {num_classes} classes; pass num_classes")
    # One thread: the weights then do not depend on the machine's core count (reductions split by
    # thread change the last bits), so runs evaluated on different machines stay comparable; and
    # small-batch steps gain little from threads but suffer badly when the cores are oversubscribed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # A private RNG stream: this may run inside a training worker whose random stream must not move.
        with torch.random.fork_rng(devices=[]):
            return _train(images_u8, labels, seed, epochs, batch_size, lr, num_classes)
    finally:
        torch.set_num_threads(threads)


def _train(
    images_u8: torch.Tensor,
    labels: torch.Tensor | None,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    num_classes: int,
) -> Classifier:
    torch.manual_seed(seed)
    head_classes = num_classes if labels is not None else ROTATIONS
    model = Classifier(head_classes, resolution=images_u8.shape[-1], channels=images_u8.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    labels = labels.long() if labels is not None else None
    model.train()
    for _ in range(epochs):
        for images, targets in _epoch_batches(images_u8, labels, batch_size, order_rng):
            loss = nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


def _epoch_batches(
    images_u8: torch.Tensor, labels: torch.Tensor | None, batch_size: int, order_rng: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's steps in a fresh order: (images in [-1, 1], targets) of the labels, or of the rotation task.

    Without labels each step takes a quarter batch of images in all four rotations, as RotNet trains
    (the paper found the four copies in one batch better than one random rotation each).
    """
    per_step = batch_size if labels is not None else max(batch_size // ROTATIONS, 1)
    order = torch.randperm(images_u8.shape[0], generator=order_rng)
    for start in range(0, order.shape[0], per_step):
        batch = order[start : start + per_step]
        if labels is None:
            yield with_rotations(to_unit_range(images_u8[batch]))
        elif batch.shape[0] >= 2:  # BatchNorm cannot train on a single image
            yield to_unit_range(images_u8[batch]), labels[batch]


def with_rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4N, C, R, R) images: `images` turned by 0, 90, 180 and 270 degrees, in that order; and (4N,) targets 0..3."""
    rotated = torch.cat([torch.rot90(images, turns, dims=(2, 3)) for turns in range(ROTATIONS)])
    return rotated, torch.arange(ROTATIONS).repeat_interleave(images.shape[0])


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor) -> torch.Tensor:
    """Class indices (N,) for float images in [-1, 1], in chunks of PREDICT_BATCH."""
    device = next(model.parameters()).device
    return torch.cat([model(chunk.to(device)).argmax(dim=1).cpu() for chunk in images.split(PREDICT_BATCH)])


def accuracy(model: Classifier, images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images_u8` (uint8) that `model` labels correctly."""
    predicted = predict(model, to_unit_range(images_u8))
    return float((predicted == labels.long()).float().mean())


def rotation_accuracy(model: Classifier, images_u8: torch.Tensor) -> float:
    """Fraction of `images_u8` (uint8) turned by 0, 90, 180 and 270 degrees whose rotation `model` names."""
    hits = 0
    for chunk in images_u8.split(PREDICT_BATCH // ROTATIONS):  # four float copies of a chunk at a time, not of all
        rotated, targets = with_rotations(to_unit_range(chunk))
        hits += int((predict(model, rotated) == targets).sum())
    return hits / (ROTATIONS * images_u8.shape[0])


def weights_digest(model: nn.Module) -> str:
    """A short sha256 of the state dict's tensors, in key order."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(
    dataset: str, fingerprint: str, seed: int, resolution: int = 28, channels: int = 1, pretext: str = PRETEXT_LABELS
) -> Path:
    """Where the classifier for one data set (by the fingerprint of its training images), shape, pretext and seed is
    cached: 28x28x1 labelled data keep the name they had before other shapes, so their caches stay valid."""
    safe_fingerprint = fingerprint.replace(":", "-")  # "60000:abc…" → a portable file name
    kind = ""
    if (resolution, channels, pretext) != (28, 1, PRETEXT_LABELS):
        kind = f"-{resolution}x{resolution}x{channels}" + ("-rot" if pretext == PRETEXT_ROTATION else "")
    return cache_root() / "classifiers" / f"{dataset}-{safe_fingerprint}{kind}-seed{seed}.pt"


def classifier_to_bytes(trained: TrainedClassifier) -> bytes:
    """The cache file's content: the state dict, its recipe and what builds its network, loadable with
    `weights_only=True`."""
    stored = {**trained.describe(), "state_dict": trained.model.state_dict()}
    del stored["digest"]  # recomputed from the weights on load, so it cannot lie
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    return buffer.getvalue()


def classifier_from_bytes(raw: bytes) -> TrainedClassifier | None:
    """Parse `classifier_to_bytes`' output; None when it is damaged or from another recipe version.

    A file written before the other shapes names no shape or pretext: it is the 28x28x1 classifier of 10 labels.
    """
    try:
        stored = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        if stored.get("recipe_version") != RECIPE_VERSION:
            return None
        pretext = stored.get("pretext", PRETEXT_LABELS)
        if pretext not in PRETEXTS:
            return None
        model = Classifier(
            int(stored.get("num_classes", NUM_CLASSES)),
            resolution=int(stored.get("resolution", 28)),
            channels=int(stored.get("channels", 1)),
        )
        model.load_state_dict(stored["state_dict"])
        model.eval().requires_grad_(False)
        return TrainedClassifier(
            model,
            weights_digest(model),
            stored["data_fingerprint"],
            stored["seed"],
            stored["epochs"],
            stored.get("test_accuracy"),
            pretext,
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
    train_images_u8: torch.Tensor,  # (N, C, R, R) uint8, the real training split
    train_labels: torch.Tensor | None,  # (N,); None = unlabelled data: the rotation task
    fingerprint: str,  # of the training images (`gan.data.ImageSet.fingerprint`)
    seed: int = 0,  # classifier seed
    epochs: int = DEFAULT_EPOCHS,  # passes over the training split when it has to be trained
    test_images_u8: torch.Tensor | None = None,  # to record test accuracy after training; None = skip
    test_labels: torch.Tensor | None = None,  # (M,) of the test images; unused without train_labels
    num_classes: int = NUM_CLASSES,  # classes of the labels; unused without them (the task has ROTATIONS)
) -> TrainedClassifier:
    """The cached classifier for this data and seed, trained (once per node, under a lock) when absent."""
    pretext = PRETEXT_LABELS if train_labels is not None else PRETEXT_ROTATION
    resolution, channels = int(train_images_u8.shape[-1]), int(train_images_u8.shape[1])
    head_classes = num_classes if train_labels is not None else ROTATIONS
    path = cache_path(dataset, fingerprint, seed, resolution, channels, pretext)
    with file_lock(path.with_suffix(".lock")):
        if path.is_file():
            cached = classifier_from_bytes(path.read_bytes())
            if cached is not None and (
                cached.data_fingerprint,
                cached.seed,
                cached.epochs,
                cached.pretext,
                cached.model.num_classes,
                cached.model.resolution,
                cached.model.channels,
            ) == (fingerprint, seed, epochs, pretext, head_classes, resolution, channels):
                return cached
        model = train_classifier(train_images_u8, train_labels, seed=seed, epochs=epochs, num_classes=num_classes)
        test_accuracy = None
        if test_images_u8 is not None and pretext == PRETEXT_ROTATION:
            test_accuracy = round(rotation_accuracy(model, test_images_u8), 4)
        elif test_images_u8 is not None and test_labels is not None:
            test_accuracy = round(accuracy(model, test_images_u8, test_labels), 4)
        trained = TrainedClassifier(model, weights_digest(model), fingerprint, seed, epochs, test_accuracy, pretext)
        _write_atomically(path, classifier_to_bytes(trained))
        return trained
