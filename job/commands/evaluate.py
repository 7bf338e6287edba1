"""The `evaluate` command: quality metrics of a checkpoint's generator, printed as one JSON object.

A run folder also gets `artifacts/eval.json` and `artifacts/classifier.pt`; `--cas` adds the Classification
Accuracy Score. Why: docs/architecture.md#quality-metrics
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

from gan.classifier import NUM_CLASSES, classifier_to_bytes
from gan.conditional_metrics import CAS_IMAGES_PER_CLASS, classification_accuracy_score, label_accuracy
from gan.metrics import QualityEvaluator, build_evaluator, check_state_dict_file, inception_fid
from gan.models import Generator
from gan.sampling import labels_split_evenly, sample, seeded_noise
from job.console import warn
from job.errors import UsageError
from job.storage.checkpoint_schema import checkpoint_num_classes, generator_from_checkpoint
from job.settings import DATASET_NAMES, EVAL_NUM, S3_ENDPOINT, SEED, Setting, add_flag
from job.storage.checkpoint import STATE_FILE, load_from
from job.storage.data_source import local_data_folder
from job.storage.location import Location, resolve_location
from job.storage.pointer import resolve_latest
from job.storage.s3_preflight import check_readable

DEFAULT_NUM = 10_000  # the size of the test split: FID's bias shrinks with the count
DATA = Setting("real data to compare with (default: the run's)", choices=DATASET_NAMES)
CAS = Setting(
    f"also score a classifier trained only on {CAS_IMAGES_PER_CLASS * NUM_CLASSES:,} generated images "
    f"({CAS_IMAGES_PER_CLASS:,} per class) against the real test split, next to the same recipe trained on the real "
    "training images (CAS; conditional models only; minutes on a CPU)",
    kind=bool,
)
EVAL_FILE = "eval.json"
CLASSIFIER_FILE = "classifier.pt"
# The fields that must agree for two evaluations' numbers to be comparable.
PROTOCOL_FIELDS = ("data", "num_images", "seed")


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of an evaluation that `evaluate` and `promote` share: the real data, the images, the endpoint."""
    add_flag(parser, "--data", DATA)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder or s3://bucket/prefix with the four IDX files (default: cache, system copy, download)",
    )
    add_flag(parser, "--num", EVAL_NUM, DEFAULT_NUM)
    add_flag(parser, "--seed", SEED, 0)
    add_flag(parser, "--s3-endpoint", S3_ENDPOINT)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `gan-job evaluate` (cli.py builds the subparser and calls this)."""
    parser.add_argument(
        "--from", dest="source", required=True, help="run folder, checkpoint folder, LATEST pointer, or s3:// of any"
    )
    add_evaluation_flags(parser)
    add_flag(parser, "--cas", CAS, False)
    parser.add_argument(
        "--inception-weights",
        default=None,
        help="local Inception weights (.pth state dict) for Inception FID; never downloaded",
    )
    parser.set_defaults(handler=evaluate)


def check_evaluation_flags(data: str | None, num: int, seed: int, inception_weights: str | None = None) -> None:
    """Refuse bad values before anything is loaded, naming the flag (for callers that did not parse them)."""
    if data is not None:
        DATA.check("--data", data)
    EVAL_NUM.check("--num", num)
    SEED.check("--seed", seed)
    if inception_weights is not None:
        try:
            check_state_dict_file(inception_weights)
        except ValueError as err:
            raise UsageError(
                f"--inception-weights {err}; pass the local Inception state dict "
                "(e.g. weights-inception-2015-12-05-6726825d.pth)"
            ) from None


def prepare_evaluator(data: str, data_dir: str | None, s3_endpoint: str | None) -> QualityEvaluator:
    """The evaluator for `data`: its IDX files (a bucket copy is fetched) and the cached classifier."""
    folder = local_data_folder(SimpleNamespace(data=data, data_dir=data_dir, s3_endpoint=s3_endpoint))
    return build_evaluator(data, folder)


def generator_for_evaluation(state: dict) -> tuple[Generator, str]:
    """The checkpoint's EMA generator when it has one, else its generator (conditional where the run was); and which
    key it was."""
    return generator_from_checkpoint(state)


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
    generator, key = generator_for_evaluation(state)
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


def is_run_folder(location: Location) -> bool:
    """A run folder holds checkpoint folders; a checkpoint folder holds the state file itself."""
    return not location.child(STATE_FILE).exists()


def evaluate(args: argparse.Namespace) -> int:
    """`gan-job evaluate`: print one JSON object of metrics for `--from`."""
    check_evaluation_flags(args.data, args.num, args.seed, args.inception_weights)
    check_readable(args.source, args.s3_endpoint, "--from")
    if args.data_dir:
        check_readable(args.data_dir, args.s3_endpoint, "--data-dir")
    source_uri = resolve_latest(args.source, args.s3_endpoint)
    location = resolve_location(source_uri, args.s3_endpoint, flag="--from")
    if not location.exists():
        raise UsageError(
            f"--from {args.source} does not exist; pass a run folder, a checkpoint_* folder or a LATEST pointer"
        )
    checkpoint, state = load_from(source_uri, args.s3_endpoint)
    num_classes = checkpoint_num_classes(
        state
    )  # refuses a checkpoint this version cannot load: before anything is built
    if args.cas and not num_classes:
        raise UsageError(
            f"--cas needs a conditional model; {checkpoint.uri} was trained without --conditional: drop --cas"
        )
    data = args.data or state["config"]["data"]
    evaluator = prepare_evaluator(data, args.data_dir, args.s3_endpoint)
    result = evaluate_state(
        evaluator, state, checkpoint.uri, data, args.num, args.seed, args.inception_weights, cas=args.cas
    )
    if is_run_folder(location):
        store_in_run(location, result, evaluator)
    print(json.dumps(result, sort_keys=False))
    return 0
