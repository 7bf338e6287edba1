"""The `promote` command: point a job's `LATEST` at a run when it passed its quality gate (`job.promotion.gate`).

Why: docs/architecture.md#promotion-by-compare-and-swap
"""

from __future__ import annotations

import argparse
import json
import sys

from job.commands.evaluate import add_evaluation_flags, check_evaluation_flags
from job.promotion.gate import MARGIN, RaceLost, promote_run
from job.settings import add_flag
from job.storage.location import resolve_location


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `gan-job promote` (cli.py builds the subparser and calls this)."""
    parser.add_argument("--run", required=True, help="the run folder to promote: <storage>/<run-name> (local or s3://)")
    parser.add_argument(
        "--target", required=True, help="the pointer to update: <storage>/<job>/LATEST (local or s3://)"
    )
    add_flag(parser, "--margin", MARGIN, 0.0)
    add_evaluation_flags(parser)
    parser.set_defaults(handler=promote)


def promote(args: argparse.Namespace) -> int:
    """`gan-job promote`: move LATEST to `--run` when it passes the gate; print and log the decision."""
    check_evaluation_flags(args.data, args.num, args.seed)
    run = resolve_location(args.run, args.s3_endpoint, flag="--run")
    target = resolve_location(args.target, args.s3_endpoint, flag="--target")
    try:
        decision = promote_run(
            run, target, args.margin, args.data, args.data_dir, args.num, args.seed, args.s3_endpoint
        )
    except RaceLost as err:
        print(f"gan-job: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(decision, sort_keys=True))
    return 0
