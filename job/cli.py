"""The command line: `gan-job` and `python -m job` are the same program.

Every `train` flag but `--promote-to` and `--promote-margin` can also come from an environment
variable `GAN_JOB_<FLAG>` (for example `GAN_JOB_EPOCHS=5`), which is how manifests pass knobs; a
flag on the command line wins, and an empty variable counts as unset. The flags, their variables,
bounds and help come from one declaration: `TrainConfig`'s fields (job/config.py, job/settings.py).
Bad input ends in one line on stderr and exit status 2, with nothing written; so does storage that
refuses a request (credentials, permissions, a missing bucket). Storage that fails past its retries
ends in one line and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

from gan.data import DataError
from job.commands import bench, data_push, evaluate, generate, promote, train, tune
from job.config import SETTINGS, TrainConfig
from job.errors import RunFailed, StorageFailed, StorageRefused, UsageError, flag_name
from job.promotion.evaluation import DEFAULT_NUM
from job.promotion.gate import PROMOTE_MARGIN, PROMOTE_TO, Promotion
from job.runtime.interrupts import Interrupted, install_interrupt_handlers
from job.runtime.local_cluster import stop_local_cluster
from job.settings import add_flag, env_var_for

# `train` flags that no environment variable sets: promoting is never a knob.
NOT_FROM_ENVIRONMENT = ("promote_to", "promote_margin")
CREDENTIALS_IN_URL = re.compile(r"//[^/@]*@")
__all__ = ["NOT_FROM_ENVIRONMENT", "build_parser", "env_var_for", "main"]


class BadEnvironment:
    """A train flag's default whose environment variable does not parse; refused once parsing is done,
    so that `--help` still works and the error names both the flag and the variable."""

    def __init__(self, flag: str, variable: str, raw: str, reason: str) -> None:
        shown = CREDENTIALS_IN_URL.sub("//***@", raw)  # an endpoint's password is never echoed
        self.message = f"{flag} from {variable}={shown!r}: {reason}"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) instead of usage plus message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = super().parse_known_args(args, namespace)
        for value in vars(parsed).values():
            if isinstance(value, BadEnvironment):
                raise UsageError(value.message)
        return parsed, extras


def _env_default(name: str) -> object:
    """The value of a train setting's GAN_JOB_* variable, parsed by its declaration; None when unset."""
    variable, spec = env_var_for(name), SETTINGS[name]
    raw = os.environ.get(variable)
    if raw is None or not raw.strip():  # empty = unset: a manifest may list a knob with no value
        return None
    try:
        return spec.parse(raw)
    except ValueError as err:
        return BadEnvironment(flag_name(name), variable, raw, str(err))


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig setting as a flag, with its GAN_JOB_* variable as the default; then the promotion flags."""
    for name, spec in SETTINGS.items():
        add_flag(parser, flag_name(name), spec, default=_env_default(name))
        action = parser._actions[-1]  # noqa: SLF001 (the action just added)
        action.help = f"{action.help} [env {env_var_for(name)}]"
    # Not knobs, on purpose: only a command line that says so moves LATEST, never a job submitted by
    # hand to a cluster whose head loads the knobs. (NOT_FROM_ENVIRONMENT lists them.)
    add_flag(parser, "--promote-to", PROMOTE_TO)
    add_flag(parser, "--promote-margin", PROMOTE_MARGIN)


def _train(args: argparse.Namespace) -> int:
    return train.run_training(_train_config(args), _promotion(args))


def _train_config(args: argparse.Namespace) -> TrainConfig:
    values = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    if "num_workers" in values:  # N or MIN-MAX, held as two settings
        values["num_workers"], values["max_workers"] = values["num_workers"]
    return TrainConfig(**values)


def _promotion(args: argparse.Namespace) -> Promotion | None:
    if args.promote_to is None and args.promote_margin is None:
        return None
    return Promotion(args.promote_to, 0.0 if args.promote_margin is None else args.promote_margin)


def _tune(args: argparse.Namespace) -> int:
    sweep = tune.sweep_args(args)  # before the config: --run-name is the sweep's to set
    return tune.run_tune(sweep, _train_config(args), _promotion(args))


def _add_tune_flags(parser: argparse.ArgumentParser) -> None:
    """train's flags (the base configuration), then the sweep's own."""
    _add_train_flags(parser)
    sweep = parser.add_argument_group("the sweep")
    add_flag(sweep, "--sweep", tune.SWEEP, required=True)
    add_flag(sweep, "--trials", tune.TRIALS, 1)
    add_flag(sweep, "--space", tune.SPACE, action="append")
    add_flag(sweep, "--scheduler", tune.SCHEDULER, "asha")
    add_flag(sweep, "--max-concurrent", tune.MAX_CONCURRENT, 2)
    add_flag(sweep, "--perturbation-interval", tune.PERTURBATION_INTERVAL, 1)
    add_flag(sweep, "--final-eval-num", tune.FINAL_EVAL_NUM, DEFAULT_NUM)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: train, tune, generate, evaluate, promote, bench, data push."""
    parser = OneLineParser(
        prog="gan-job", description="Train the TensorFlow-tutorial DCGAN with Ray Train and PyTorch DDP."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train_parser = commands.add_parser(
        "train", help="train (or resume) a run on Ray Train", description="Train or resume a run."
    )
    _add_train_flags(train_parser)
    train_parser.set_defaults(handler=_train)
    tune_parser = commands.add_parser(
        "tune",
        help="search train's settings with Ray Tune (asha, pbt or fifo), rank the trials by FID, promote the best",
        description="A sweep of train runs on Ray Tune; the same --sweep again resumes it. Why: docs/tune.md",
    )
    _add_tune_flags(tune_parser)
    tune_parser.set_defaults(handler=_tune)
    generate.add_generate_arguments(
        commands.add_parser("generate", help="images from a run's latest (or a given) checkpoint")
    )
    evaluate.add_evaluate_arguments(
        commands.add_parser("evaluate", help="quality metrics of a run or checkpoint, as one JSON object")
    )
    promote.add_promote_arguments(
        commands.add_parser("promote", help="point LATEST at a finished run if it is no worse than the current one")
    )
    bench.add_bench_arguments(
        commands.add_parser("bench", help="time the training step on this machine (needs only PyTorch)")
    )

    data = commands.add_parser("data", help="manage the IDX files")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    data_push.add_push_arguments(data_commands.add_parser("push", help="upload the four IDX files to a bucket"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failed, 2 bad input, 3 `train --promote-to`: trained,
    promotion failed; 128 + the signal when SIGINT or SIGTERM ended it)."""
    install_interrupt_handlers()
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except (Interrupted, KeyboardInterrupt) as stop:  # the cluster it started goes with it; runs resume from there
        stop_local_cluster()
        print("gan-job: interrupted", file=sys.stderr, flush=True)
        return stop.status if isinstance(stop, Interrupted) else 130
    except (UsageError, DataError, StorageRefused) as err:
        message = " ".join(str(err).split())
        print(f"gan-job: error: {message}", file=sys.stderr)
        return 2
    except RunFailed as err:  # the run failed past its restarts: its checkpoints are kept
        print(f"gan-job: {err}", file=sys.stderr, flush=True)
        return 1
    except StorageFailed as err:  # retried within its bounds, then given up
        print(f"gan-job: error: {' '.join(str(err).split())}; {err.outcome}", file=sys.stderr)
        return 1
    except OSError as err:  # a local file outside the storage layer (say, the classifier cache) that cannot be read
        print(f"gan-job: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
