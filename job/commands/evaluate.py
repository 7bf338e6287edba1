"""The `evaluate` command: quality metrics of a checkpoint's generator, printed as one JSON object
(`job.promotion.evaluation` measures them).

A run folder also gets `artifacts/eval.json` and `artifacts/classifier.pt`; `--cas` adds the Classification
Accuracy Score. Why: docs/architecture.md#quality-metrics
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from gan.classifier import NUM_CLASSES
from gan.conditional_metrics import CAS_IMAGES_PER_CLASS
from gan.metrics import check_state_dict_file
from job.errors import UsageError
from job.promotion.evaluation import DEFAULT_NUM, DEFAULT_SEED, evaluate_state, prepare_evaluator, store_in_run
from job.settings import DATA as DATA_SETTING
from job.settings import EVAL_NUM, S3_ENDPOINT, SEED, Setting, add_flag
from job.storage.checkpoint import STATE_FILE, load_from
from job.storage.checkpoint_schema import checkpoint_num_classes
from job.storage.location import Location, resolve_location
from job.storage.pointer import resolve_latest
from job.storage.s3_preflight import check_readable

DATA = dataclasses.replace(
    DATA_SETTING, help="real data to compare with: a name, a path or s3:// prefix (default: the run's)"
)
CAS = Setting(
    f"also score a classifier trained only on {CAS_IMAGES_PER_CLASS * NUM_CLASSES:,} generated images "
    f"({CAS_IMAGES_PER_CLASS:,} per class) against the real test split, next to the same recipe trained on the real "
    "training images (CAS; conditional models only; minutes on a CPU)",
    kind=bool,
)


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of an evaluation that `evaluate` and `promote` share: the real data, the images, the endpoint."""
    add_flag(parser, "--data", DATA)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder or s3://bucket/prefix with the four IDX files (default: cache, system copy, download)",
    )
    add_flag(parser, "--num", EVAL_NUM, DEFAULT_NUM)
    add_flag(parser, "--seed", SEED, DEFAULT_SEED)
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
    evaluator = prepare_evaluator(data, args.data_dir, args.s3_endpoint, state)
    result = evaluate_state(
        evaluator, state, checkpoint.uri, data, args.num, args.seed, args.inception_weights, cas=args.cas
    )
    if is_run_folder(location):
        store_in_run(location, result, evaluator)
    print(json.dumps(result, sort_keys=False))
    return 0
