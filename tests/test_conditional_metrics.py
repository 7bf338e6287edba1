"""A conditional generator measured as training data: label accuracy, CAS, and the evenly labelled inputs."""

import json

import pytest
import torch

from gan.classifier import PRETEXT_ROTATION, TrainedClassifier, train_classifier, weights_digest
from gan.conditional_metrics import (
    CAS_EPOCHS,
    CAS_SEED,
    accuracy_by_class,
    classification_accuracy_score,
    generated_training_set,
    label_accuracy,
    to_uint8,
)
from gan.data import load_split, to_unit_range
from gan.metrics import build_evaluator
from gan.models import Generator
from gan.sampling import conditional_inputs, sample, seeded_noise

SIDE_KEYS = {"overall", "per_class", "count_per_class"}


@pytest.fixture(scope="module")
def small_fashion(small_fashion_dir):
    """1,000 real training and 500 real test images, and the CAS recipe trained on the training ones."""
    train_set, test_set = load_split(small_fashion_dir, "train"), load_split(small_fashion_dir, "test")
    model = train_classifier(train_set.images, train_set.labels, seed=CAS_SEED, epochs=CAS_EPOCHS)
    trained = TrainedClassifier(model, weights_digest(model), train_set.fingerprint, CAS_SEED, CAS_EPOCHS, None)
    return train_set, test_set, trained


def real_images_for_labels(images_u8: torch.Tensor, labels: torch.Tensor, label_shift: int = 0):
    """A labels → images source handing out real images of class (asked + label_shift) % 10, cycling through them."""
    by_class = {c: images_u8[labels == c] for c in range(10)}
    handed_out = dict.fromkeys(range(10), 0)

    def images_for_labels(asked: torch.Tensor) -> torch.Tensor:
        picked = []
        for label in ((asked + label_shift) % 10).tolist():
            picked.append(by_class[label][handed_out[label] % by_class[label].shape[0]])
            handed_out[label] += 1
        return to_unit_range(torch.stack(picked))

    return images_for_labels


def test_accuracy_by_class_counts_hits_per_true_class_and_leaves_absent_classes_none():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 0, 5, 1, 0, 2])
    score = accuracy_by_class(predicted, labels, num_classes=4)
    assert score == {"overall": round(5 / 7, 4), "per_class": [0.75, 0.5, 1.0, None], "count_per_class": [4, 2, 1, 0]}


def test_images_of_the_asked_class_score_the_real_accuracy_class_by_class(small_fashion):
    _, test_set, classifier = small_fashion
    # Ask for each test image's own class, in class order: the "generated" set is the test split itself.
    order = torch.argsort(test_set.labels, stable=True)
    asked = test_set.labels[order].long()
    generated = real_images_for_labels(test_set.images, test_set.labels)(asked)
    result = label_accuracy(generated, asked, classifier, to_unit_range(test_set.images), test_set.labels)
    assert result["generated"] == result["real_test"]
    assert result["real_test"]["overall"] > 0.6  # the classifier is worth measuring with
    json.dumps(result)


def test_images_of_the_wrong_class_score_low(small_fashion):
    _, test_set, classifier = small_fashion
    asked = test_set.labels.long()
    generated = real_images_for_labels(test_set.images, test_set.labels, label_shift=1)(asked)
    result = label_accuracy(generated, asked, classifier, to_unit_range(test_set.images), test_set.labels)
    assert result["generated"]["overall"] < 0.2 < result["real_test"]["overall"]
    assert len(result["generated"]["per_class"]) == 10
    assert sum(result["generated"]["count_per_class"]) == test_set.labels.shape[0]


def test_label_accuracy_wants_one_label_per_image(small_fashion):
    _, test_set, classifier = small_fashion
    images = to_unit_range(test_set.images[:5])
    with pytest.raises(ValueError, match="one label per image"):
        label_accuracy(images, torch.zeros(4, dtype=torch.long), classifier, images, test_set.labels[:5])


def test_cas_of_real_images_is_close_to_the_real_data_score(small_fashion):
    train_set, test_set, real_classifier = small_fashion
    source = real_images_for_labels(train_set.images, train_set.labels)
    result = classification_accuracy_score(
        source, real_classifier, to_unit_range(test_set.images), test_set.labels, images_per_class=100,
    )  # fmt: skip
    generated, real = result["generated"], result["real"]
    assert generated["num_train_images"] == 1000 == real["num_train_images"]
    assert abs(generated["overall"] - real["overall"]) < 0.08
    assert real["overall"] > 0.6


def test_cas_of_images_of_the_wrong_class_is_near_chance(small_fashion):
    train_set, test_set, real_classifier = small_fashion
    source = real_images_for_labels(train_set.images, train_set.labels, label_shift=3)
    result = classification_accuracy_score(
        source, real_classifier, to_unit_range(test_set.images), test_set.labels, images_per_class=50
    )
    assert result["generated"]["overall"] < 0.15 < 0.6 < result["real"]["overall"]


def test_cas_gives_plain_json_with_both_sides_their_times_and_the_recipe(small_fashion):
    train_set, test_set, real_classifier = small_fashion
    torch.manual_seed(0)
    generator = Generator(8, num_classes=10)
    real_test = to_unit_range(test_set.images)
    result = classification_accuracy_score(generator, real_classifier, real_test, test_set.labels, images_per_class=4)
    assert json.loads(json.dumps(result)) == result
    assert set(result) == {"generated", "real", "recipe"}
    generated_keys = {"num_train_images", "images_per_class", "generate_time_s", "train_time_s", "test_time_s"}
    assert SIDE_KEYS | generated_keys == set(result["generated"])
    assert SIDE_KEYS | {"num_train_images", "classifier_digest", "test_time_s"} == set(result["real"])
    for side in ("generated", "real"):
        assert len(result[side]["per_class"]) == 10
        assert sum(result[side]["count_per_class"]) == test_set.labels.shape[0]  # scored on the whole test split
    assert result["generated"]["num_train_images"] == 40
    assert result["recipe"]["seed"] == CAS_SEED and result["recipe"]["epochs"] == CAS_EPOCHS


def test_cas_refuses_a_real_data_classifier_of_another_recipe(small_fashion):
    train_set, test_set, real_classifier = small_fashion
    other = TrainedClassifier(
        real_classifier.model, real_classifier.digest, train_set.fingerprint, CAS_SEED, CAS_EPOCHS + 1, None
    )
    with pytest.raises(ValueError, match="like with like"):
        classification_accuracy_score(
            lambda labels: torch.zeros(len(labels), 1, 28, 28),
            other,
            to_unit_range(test_set.images),
            test_set.labels,
            images_per_class=1,
        )


def test_cas_refuses_an_unconditional_generator():
    with pytest.raises(ValueError, match="unconditional"):
        generated_training_set(Generator(8), images_per_class=1)


def test_the_cas_training_set_holds_6000_images_of_each_class_60000_in_all():
    asked = []

    def black_images(labels: torch.Tensor) -> torch.Tensor:
        asked.append(labels.shape[0])
        return torch.full((labels.shape[0], 1, 28, 28), -1.0)

    images_u8, labels = generated_training_set(black_images)
    assert images_u8.shape == (60_000, 1, 28, 28) and images_u8.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [6_000] * 10
    assert int(images_u8.max()) == 0
    assert max(asked) <= 1024  # made chunk by chunk


def test_a_generator_s_training_set_does_not_depend_on_the_chunk_size_and_pairs_noise_with_labels():
    torch.manual_seed(0)
    generator = Generator(8, num_classes=10)
    images_small_chunks, labels = generated_training_set(generator, images_per_class=3, noise_seed=5, chunk=7)
    images_one_chunk, _ = generated_training_set(generator, images_per_class=3, noise_seed=5)
    assert torch.equal(images_small_chunks, images_one_chunk)
    noise, expected_labels = conditional_inputs(30, 8, 10, seed=5)
    assert torch.equal(labels, expected_labels)
    assert torch.equal(images_one_chunk, to_uint8(sample(generator, noise, labels)))


def test_to_uint8_inverts_to_unit_range():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_unit_range(pixels)), pixels)


def test_conditional_inputs_split_the_classes_evenly_with_the_unconditional_noise():
    noise, labels = conditional_inputs(25, 4, 10, seed=3)
    assert torch.equal(noise, seeded_noise(25, 4, seed=3))
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 5 + [2] * 5
    assert labels.tolist() == sorted(labels.tolist())


def test_build_evaluator_keeps_the_test_labels_for_label_accuracy(small_fashion_dir):
    train_set, test_set = load_split(small_fashion_dir, "train"), load_split(small_fashion_dir, "test")
    evaluator = build_evaluator("fashion-mnist", train_set, test_set, num_classes=10)
    assert torch.equal(evaluator.real_test_labels, test_set.labels)


# Other shapes and class counts (#30) ---------------------------------------------------------------


def _coloured(count: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 RGB images whose class is the colour channel that is lit: an easy task, learnt in two epochs."""
    labels = torch.arange(count) % num_classes
    images = torch.randint(0, 60, (count, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
    images[torch.arange(count), labels] += 190
    return images.to(torch.uint8), labels


def test_cas_and_label_accuracy_work_for_32x32x3_images_of_three_classes():
    train_u8, train_labels = _coloured(60, 3, seed=0)
    test_u8, test_labels = _coloured(30, 3, seed=1)
    model = train_classifier(train_u8, train_labels, seed=CAS_SEED, epochs=CAS_EPOCHS, num_classes=3)
    real = TrainedClassifier(model, weights_digest(model), "60:coloured", CAS_SEED, CAS_EPOCHS, None)
    generator = Generator(8, num_classes=3, resolution=32, channels=3)
    result = classification_accuracy_score(
        generator, real, to_unit_range(test_u8), test_labels, images_per_class=2, num_classes=3
    )
    assert result["generated"]["num_train_images"] == 6 and len(result["generated"]["per_class"]) == 3
    assert result["real"]["overall"] > 0.9  # the fresh network of the real side's shape learnt the real task
    asked = torch.tensor([0, 1, 2])
    accuracy = label_accuracy(
        generator.eval()(torch.randn(3, 8), asked), asked, real, to_unit_range(test_u8), test_labels
    )
    assert len(accuracy["generated"]["per_class"]) == 3 and accuracy["real_test"]["overall"] > 0.9


def test_a_generated_training_set_takes_the_shape_it_is_given():
    images_u8, _ = generated_training_set(
        lambda labels: torch.zeros(len(labels), 3, 64, 64), images_per_class=2, num_classes=3, image_shape=(3, 64, 64)
    )
    assert images_u8.shape == (6, 3, 64, 64)
    with pytest.raises(ValueError, match=r"it must give \(n, 3, 32, 32\)"):
        generated_training_set(
            lambda labels: torch.zeros(len(labels), 1, 28, 28), images_per_class=1, image_shape=(3, 32, 32)
        )


def test_label_metrics_refuse_a_classifier_of_the_rotation_task():
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    model = train_classifier(images, None, seed=CAS_SEED, epochs=CAS_EPOCHS)
    rotation = TrainedClassifier(model, weights_digest(model), "8:x", CAS_SEED, CAS_EPOCHS, None, PRETEXT_ROTATION)
    unit = to_unit_range(images)
    with pytest.raises(ValueError, match="rotation task, not on labels"):
        label_accuracy(unit, torch.zeros(8, dtype=torch.long), rotation, unit, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="rotation task, not on labels"):
        classification_accuracy_score(Generator(8, num_classes=10), rotation, unit, torch.zeros(8), images_per_class=1)
