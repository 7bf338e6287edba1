"""The evaluation of a checkpoint's generator, as `evaluate` prints it and `promote` and `tune` compare it.

Every number is measured in the feature space of a small classifier trained on the real training split, on
`num` images from seeded noise; two results compare only when their protocol agrees (`same_protocol`).
Why: docs/architecture.md#quality-metrics
"""

from __future__ import annotations

import json
import time

from gan.classifier import classifier_to_bytes
from gan.conditional_metrics import classification_accuracy_score, label_accuracy
from gan.metrics import QualityEvaluator, build_evaluator, inception_fid
from gan.sampling import labels_split_evenly, sample, seeded_noise
from job.console import warn
from job.storage.checkpoint_schema import generator_from_checkpoint, image_shape
from job.storage.data_source import load_dataset
from job.storage.location import Location

DEFAULT_NUM = 10_000  # the size of the test split: FID's bias shrinks with the count
DEFAULT_SEED = 0  # of the noise: evaluate's, promote's and the sweep's final evaluation, so their results compare
EVAL_FILE = "eval.json"
CLASSIFIER_FILE = "classifier.pt"
# The fields that must agree for two evaluations' numbers to be comparable.
PROTOCOL_FIELDS = ("data", "num_images", "seed")


def prepare_evaluator(
    data: str, data_dir: str | None, s3_endpoint: str | None, state: dict | None = None
) -> QualityEvaluator:
    """The evaluator for `data` as it is now (its current test split: a prefix that grew is measured on what it
    holds now), at the shape of the checkpoint `state` (the data's own without one), and its cached classifier."""
    resolution, channels = image_shape(state) if state is not None else (None, None)
    dataset = load_dataset(data, data_dir, s3_endpoint, resolution, channels)
    return build_evaluator(dataset.cache_key, dataset.train, dataset.test, dataset.num_classes)


def evaluate_state(
    evaluator: QualityEvaluator,  # the reference data and classifier
    state: dict,  # a checkpoint (`job.storage.checkpoint.load_from`)
    source: str,  # the checkpoint folder's URI, recorded in the result
    data: str,  # dataset name, recorded in the result
    num: int,  # generated images
    seed: int,  # seed of their noise
    inception_weights: str | None = None,  # local Inception weights; None = Inception FID not computed
    cas: bool = False,  # conditional G only: also the Classification Accuracy Score (minutes on a CPU)
) -> dict:
    """Every metric of one checkpoint's generator, as one JSON-ready dict (a conditional G's label metrics too)."""
    started_s = time.perf_counter()
    generator, key = generator_from_checkpoint(state)
    # A conditional G makes every class, as many of each (class order; the metrics are of the whole set).
    labels = labels_split_evenly(num, range(generator.num_classes)) if generator.num_classes else None
    images = sample(generator, seeded_noise(num, generator.noise_dim, seed), labels)
    result = {
        "source": source,
        "epoch": int(state["epoch"]),
        "data": data,
        "num_images": num,
        "seed": seed,
        "generator": key,
        **evaluator.compute(images),
        "inception_fid": inception_fid(images, evaluator.real_test, inception_weights),
    }
    if labels is not None:
        # Does each image show the class it was asked for? The real test split's accuracy is the ceiling.
        result["label_accuracy"] = label_accuracy(
            images, labels, evaluator.classifier, evaluator.real_test, evaluator.real_test_labels
        )
        result["conditional"] = True
    if cas:  # of an unconditional G it raises ValueError; `evaluate` refuses --cas on one before anything is built
        result["cas"] = classification_accuracy_score(
            generator,
            evaluator.classifier,
            evaluator.real_test,
            evaluator.real_test_labels,
            num_classes=generator.num_classes,
            noise_seed=seed,
        )
    result["reference"] = evaluator.describe()
    result["eval_time_s"] = round(time.perf_counter() - started_s, 2)
    return result


def protocol_of(result: dict) -> dict:
    """The fields of an evaluation that decide whether its numbers compare with another's."""
    return {name: result.get(name) for name in (*PROTOCOL_FIELDS, "reference")}


def same_protocol(first: dict, second: dict) -> bool:
    """Whether two evaluation results measure alike (same data, count, noise seed, classifier and test set)."""
    if any(first.get(name) != second.get(name) for name in PROTOCOL_FIELDS):
        return False
    ref_a, ref_b = first.get("reference") or {}, second.get("reference") or {}
    digest_a, digest_b = (ref_a.get("classifier") or {}).get("digest"), (ref_b.get("classifier") or {}).get("digest")
    return (
        digest_a is not None and digest_a == digest_b and ref_a.get("test_fingerprint") == ref_b.get("test_fingerprint")
    )


def store_in_run(run: Location, result: dict, evaluator: QualityEvaluator) -> None:
    """Write `eval.json` and the classifier next to the run; a read-only run is only warned about."""
    artifacts = run.child("artifacts")
    try:
        artifacts.child(CLASSIFIER_FILE).write_bytes(classifier_to_bytes(evaluator.classifier))
        artifacts.child(EVAL_FILE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    except OSError as err:  # results still print; only the stored copy is missing
        warn(f"could not store the evaluation in {artifacts.uri} ({type(err).__name__}: {err})")


def run_evaluation(
    run: Location, checkpoint: Location, state: dict, evaluator: QualityEvaluator, data: str, num: int, seed: int
) -> dict:
    """The run's stored `eval.json` when it measured this checkpoint alike, else a fresh evaluation (then stored)."""
    wanted = {"data": data, "num_images": num, "seed": seed, "reference": evaluator.describe()}
    try:  # a read that fails raises, rather than evaluating again and writing over the stored result
        stored = json.loads(run.child("artifacts", EVAL_FILE).read_text())
    except (FileNotFoundError, ValueError):
        stored = None
    if isinstance(stored, dict) and stored.get("source") == checkpoint.uri and same_protocol(stored, wanted):
        return stored
    result = evaluate_state(evaluator, state, checkpoint.uri, data, num, seed)
    store_in_run(run, result, evaluator)
    return result
