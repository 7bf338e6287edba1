"""Metrics of a class-conditional generator as a source of labelled training data.

`label_accuracy` (generated images against the labels asked for) and `classification_accuracy_score` (CAS: a
classifier trained only on generated images, tested on real ones). Why: docs/architecture.md#quality-metrics
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from gan.classifier import (
    BATCH_SIZE,
    DEFAULT_EPOCHS,
    LEARNING_RATE,
    NUM_CLASSES,
    PRETEXT_LABELS,
    RECIPE_VERSION,
    Classifier,
    TrainedClassifier,
    predict,
    train_classifier,
)
from gan.data import to_uint8
from gan.sampling import CHUNK, conditional_inputs, sample, seeded_noise

CAS_IMAGES_PER_CLASS = 6_000  # 60,000 in all: the size of the real training split it is compared with
CAS_SEED = 0  # the project classifier's seed (`build_evaluator`'s default), so its cache is the real side
CAS_EPOCHS = DEFAULT_EPOCHS  # the project classifier's epochs, for the same reason
CAS_NOISE_SEED = 0  # the generated training set's noise

# labels (n,) int64 → images (n, C, R, R) float in [-1, 1]: what CAS needs of a generator.
ImagesForLabels = Callable[[torch.Tensor], torch.Tensor]


def accuracy_by_class(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> dict:
    """{"overall", "per_class", "count_per_class"} of predicted vs true labels (N,); a class with no image gets None."""
    labels, correct = labels.long().cpu(), (predicted.long().cpu() == labels.long().cpu())
    counts = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    per_class = [round(float(h / c), 4) if c > 0 else None for h, c in zip(hits, counts)]
    overall = round(float(correct.double().mean()), 4) if labels.numel() else None
    return {"overall": overall, "per_class": per_class, "count_per_class": counts.tolist()}


def label_accuracy(
    generated: torch.Tensor,  # (N, C, R, R) float in [-1, 1], from a conditional G
    requested_labels: torch.Tensor,  # (N,) the class each image was asked to be
    classifier: Classifier | TrainedClassifier,  # the project classifier (trained on the real training split)
    real_test: torch.Tensor,  # (M, C, R, R) float in [-1, 1]: the real test split
    real_test_labels: torch.Tensor,  # (M,)
) -> dict:
    """The classifier's accuracy on generated images against their requested labels, and on the real test split.

    Returns {"generated": {...}, "real_test": {...}}, each {"overall", "per_class", "count_per_class"}.
    """
    if requested_labels.shape != generated.shape[:1]:
        raise ValueError(
            f"{requested_labels.shape[0]} labels for {generated.shape[0]} generated images; pass one label per image"
        )
    _check_trained_on_labels(classifier)
    model = classifier.model if isinstance(classifier, TrainedClassifier) else classifier
    num_classes = model.head.out_features
    return {
        "generated": accuracy_by_class(predict(model, generated), requested_labels, num_classes),
        "real_test": accuracy_by_class(predict(model, real_test), real_test_labels, num_classes),
    }


def _check_trained_on_labels(classifier: Classifier | TrainedClassifier) -> None:
    """Refuse a classifier of the rotation task: its classes are rotations, not the data's."""
    if isinstance(classifier, TrainedClassifier) and classifier.pretext != PRETEXT_LABELS:
        raise ValueError(
            f"this classifier was trained on the {classifier.pretext} task, not on labels: "
            "label accuracy and CAS need labelled data"
        )


def as_images_for_labels(source: nn.Module | ImagesForLabels, num: int, noise_seed: int) -> ImagesForLabels:
    """A conditional G as a labels → images callable; a callable is returned as it is.

    G's `num` noise vectors are drawn once from `noise_seed` and handed out in order, so an image
    depends on its position in the set, not on how the set is cut into chunks.
    """
    if not isinstance(source, nn.Module):
        return source
    generator = source
    if not getattr(generator, "num_classes", 0):
        raise ValueError(
            "this generator is unconditional (num_classes=0): label accuracy and CAS need one trained with labels"
        )
    noise = seeded_noise(num, generator.noise_dim, noise_seed)  # as `conditional_inputs` draws it
    used = 0

    def images_for_labels(labels: torch.Tensor) -> torch.Tensor:
        nonlocal used
        chunk_noise = noise[used : used + labels.shape[0]]
        used += labels.shape[0]
        return sample(generator, chunk_noise, labels)

    return images_for_labels


def generated_training_set(
    source: nn.Module | ImagesForLabels,  # a conditional G, or labels → images
    images_per_class: int = CAS_IMAGES_PER_CLASS,  # as many images of each class
    num_classes: int = NUM_CLASSES,
    noise_seed: int = CAS_NOISE_SEED,  # G's noise; unused by a callable
    chunk: int = CHUNK,  # images per generator call: bounds the float images held at once
    image_shape: tuple[int, int, int] = (1, 28, 28),  # (C, R, R) of each image, as the real data's
) -> tuple[torch.Tensor, torch.Tensor]:
    """`images_per_class` × `num_classes` generated images as uint8 (N, C, R, R), with their labels (N,).

    Made chunk by chunk and stored as 8-bit pixels (a quarter of float32's memory: 47 MB for
    60,000 of 28x28x1), the form in which the real training split reaches the classifier.
    """
    num = images_per_class * num_classes
    _, labels = conditional_inputs(num, 1, num_classes, noise_seed)  # 0…0, 1…1, …: as many of each
    images_for_labels = as_images_for_labels(source, num, noise_seed)
    images_u8 = torch.empty(num, *image_shape, dtype=torch.uint8)
    for start in range(0, num, chunk):
        chunk_labels = labels[start : start + chunk]
        images = images_for_labels(chunk_labels)
        if tuple(images.shape) != (chunk_labels.shape[0], *image_shape):
            raise ValueError(
                f"the image source gave {tuple(images.shape)} for {chunk_labels.shape[0]} labels; "
                f"it must give (n, {', '.join(map(str, image_shape))})"
            )
        images_u8[start : start + chunk] = to_uint8(images.float().cpu())
    return images_u8, labels


def _test_score(model: Classifier, real_test: torch.Tensor, real_test_labels: torch.Tensor, num_classes: int) -> dict:
    started_s = time.perf_counter()
    score = accuracy_by_class(predict(model, real_test), real_test_labels, num_classes)
    return {**score, "test_time_s": round(time.perf_counter() - started_s, 2)}


def classification_accuracy_score(
    source: nn.Module | ImagesForLabels,  # a conditional G (sampled in inference mode), or labels → images
    real_classifier: TrainedClassifier,  # the CAS recipe on the real training split: the project classifier
    real_test: torch.Tensor,  # (M, C, R, R) float in [-1, 1]: the real test split both are scored on
    real_test_labels: torch.Tensor,  # (M,)
    images_per_class: int = CAS_IMAGES_PER_CLASS,  # generated training images of each class
    num_classes: int = NUM_CLASSES,
    noise_seed: int = CAS_NOISE_SEED,  # G's noise for the generated training set
) -> dict:
    """CAS: a fresh classifier trained only on generated images, scored on the real test split,
    next to the real-data score.

    Returns {"generated": {...}, "real": {...}, "recipe": {...}}; each side has "overall",
    "per_class", "count_per_class" (of the test split), "num_train_images" and its seconds. The
    real side reuses `real_classifier` (trained before, usually read from the cache): its seconds
    are only the test pass. The generated side's are generating, training and testing.
    Deterministic: the same G, seeds and data give the same numbers. Cost: see the module docstring
    (minutes for 60,000 images on a CPU: it is opt-in in `evaluate`). The generated images have the
    real classifier's shape, and the fresh classifier is of the same architecture.
    """
    _check_trained_on_labels(real_classifier)
    if real_classifier.seed != CAS_SEED or real_classifier.epochs != CAS_EPOCHS:
        raise ValueError(
            f"the real-data classifier was trained with seed {real_classifier.seed} "
            f"for {real_classifier.epochs} epochs; CAS compares like with like: "
            f"pass the classifier of seed {CAS_SEED} and {CAS_EPOCHS} epochs (build_evaluator's default)"
        )
    generate_started_s = time.perf_counter()
    real_model = real_classifier.model
    image_shape = (real_model.channels, real_model.resolution, real_model.resolution)
    images_u8, labels = generated_training_set(
        source, images_per_class, num_classes, noise_seed, image_shape=image_shape
    )
    generate_time_s = time.perf_counter() - generate_started_s
    train_started_s = time.perf_counter()
    model = train_classifier(images_u8, labels, seed=CAS_SEED, epochs=CAS_EPOCHS, num_classes=num_classes)
    train_time_s = time.perf_counter() - train_started_s
    # gan.data fingerprints are "count:digest"
    real_train_count = int(real_classifier.data_fingerprint.split(":", 1)[0])
    return {
        "generated": {
            **_test_score(model, real_test, real_test_labels, num_classes),
            "num_train_images": int(labels.shape[0]),
            "images_per_class": images_per_class,
            "generate_time_s": round(generate_time_s, 2),
            "train_time_s": round(train_time_s, 2),
        },
        "real": {
            **_test_score(real_classifier.model, real_test, real_test_labels, num_classes),
            "num_train_images": real_train_count,
            "classifier_digest": real_classifier.digest,
        },
        "recipe": {
            "architecture": "gan.classifier.Classifier",
            "recipe_version": RECIPE_VERSION,
            "seed": CAS_SEED,
            "epochs": CAS_EPOCHS,
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "noise_seed": noise_seed,
        },
    }
