"""The command line: `gan-job` and `python -m job` are the same program.

Every `train` flag but `--promote-to` and `--promote-margin` can also come from an environment
variable `GAN_JOB_<FLAG>` (for example `GAN_JOB_EPOCHS=5`), which is how manifests pass knobs; a
flag on the command line wins. Bad input ends in one line on stderr and exit status 2, with nothing
written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from job.errors import UsageError

ENV_PREFIX = "GAN_JOB_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
# `train` flags that no environment variable sets: promoting is never a knob.
NOT_FROM_ENVIRONMENT = ("promote_to", "promote_margin")


def env_var_for(dest: str) -> str:
    """The environment variable that stands in for a train flag: `num_workers` → `GAN_JOB_NUM_WORKERS`."""
    return ENV_PREFIX + dest.upper()


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) instead of usage plus message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


def worker_range(text: str) -> tuple[int, int]:
    """`--num-workers`: N (a fixed group) or MIN-MAX (an elastic one), 1 <= MIN <= MAX."""
    low, dash, high = text.strip().partition("-")
    try:
        bounds = (int(low), int(high) if dash else int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN-MAX (e.g. 2, or 1-4)") from None
    if bounds[0] < 1 or bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN-MAX with 1 <= MIN <= MAX (e.g. 2, or 1-4)")
    return bounds


def _env_bool(dest: str) -> bool:
    raw = os.environ.get(env_var_for(dest), "").strip().lower()
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise UsageError(f"{env_var_for(dest)}={raw!r} is not a boolean; use true or false")


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    def flag(name: str, type_: Callable, help_: str, **kwargs: object) -> None:
        dest = name[2:].replace("-", "_")
        env = env_var_for(dest)
        parser.add_argument(name, type=type_, default=os.environ.get(env), help=f"{help_} [env {env}]", **kwargs)

    def switch(name: str, help_: str) -> None:
        dest = name[2:].replace("-", "_")
        parser.add_argument(name, action="store_true", default=_env_bool(dest), help=f"{help_} [env {env_var_for(dest)}]")

    flag("--data", str, "dataset: mnist (default) or fashion-mnist", choices=("mnist", "fashion-mnist"))
    flag("--data-dir", str, "folder or s3://bucket/prefix with the four IDX files (default: cache, system copy, download)")
    flag("--epochs", int, "total epochs of the run (default 50)")
    flag("--batch-size", int, "global batch, split evenly across workers (default: the recipe's; tutorial 256)")
    flag("--num-workers", worker_range, "Ray Train workers, one DDP rank each: N, or MIN-MAX to grow with the cluster (default 1)")
    flag("--elastic-resize-interval", float, "with --num-workers MIN-MAX: seconds between checks for room to grow (default 60)")
    switch("--use-gpu", "one GPU per worker, NCCL between workers")
    flag("--storage", str, "folder or s3://bucket/prefix for runs (default ~/gan-job-runs)")
    flag("--run-name", str, "run folder under storage; the same name again resumes (default: the Ray submission id, else a timestamp)")
    flag("--limit", int, "train on the first N images only (default: all)")
    flag("--seed", int, "seed of weights, noise, shuffling and sample noise (default 0)")
    flag("--checkpoint-every", int, "epochs between checkpoints; the last epoch always gets one (default 1)")
    flag("--keep-checkpoints", int, "checkpoints kept in storage (default 2)")
    flag("--max-failures", int, "worker-group restarts before the run fails (default 2)")
    flag("--cpus-per-worker", int, "CPUs and torch threads per worker (default: the largest node type's CPUs / workers)")
    flag("--placement-timeout", int, "seconds to wait for an autoscaler to start the workers' nodes before giving up (default 600)")
    flag("--recipe", str, "hyperparameters: tutorial (default, the tutorial's unchanged) or stable", choices=("tutorial", "stable"))
    flag("--lr", float, "Adam learning rate of both networks (default: the recipe's; tutorial 1e-4)")
    flag("--beta1", float, "Adam beta1 of both networks (default: the recipe's; tutorial 0.9)")
    flag("--ema-decay", float, "decay of an EMA of G's weights used for samples and the model, 0 = off (default: the recipe's)")
    flag("--eval-every", int, "epochs between quality evaluations during training, 0 = never (default 1)")
    flag("--eval-num", int, "generated images per training-time evaluation (default 2000)")
    flag("--on-divergence", str, "non-finite loss or saturated D: warn, rollback (default) or stop", choices=("warn", "rollback", "stop"))
    flag("--on-collapse", str, "coverage far below the run's recent level: warn (default), rollback or stop", choices=("warn", "rollback", "stop"))
    flag("--noise-dim", int, "length of the generator's noise vector (default 100)")
    flag("--precision", str, "auto (bf16 autocast where the hardware does bf16 natively), fp32 or bf16", choices=PRECISION_CHOICES)
    flag("--s3-endpoint", str, "S3 endpoint URL, e.g. http://minio:9000 (default: AWS_ENDPOINT_URL)")
    switch("--create-bucket", "create the --storage bucket if it is missing")
    # Not knobs, on purpose: only a command line that says so moves LATEST, never a job submitted by
    # hand to a cluster whose head loads the knobs. (NOT_FROM_ENVIRONMENT lists them.)
    parser.add_argument(
        "--promote-to", default=None, metavar="<storage>/<job>/LATEST",
        help="after training finished, promote the run to this pointer as `promote` does with its defaults; "
        "exit status 3 if the promotion fails (no environment variable)",
    )  # fmt: skip
    parser.add_argument(
        "--promote-margin", type=float, default=None, metavar="M",
        help="with --promote-to: promote's --margin (default 0: no worse than the current LATEST; no environment variable)",
    )  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from job.config import TrainConfig
    from job.commands.train import Promotion, run_training

    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "num_workers" in values:  # N or MIN-MAX, held as two settings
        values["num_workers"], values["max_workers"] = values["num_workers"]
    config = TrainConfig(**values)
    promotion = None
    if args.promote_to is not None or args.promote_margin is not None:
        promotion = Promotion(args.promote_to, 0.0 if args.promote_margin is None else args.promote_margin)
    return run_training(config, promotion)


def _generate(args: argparse.Namespace) -> int:
    from job.commands.generate import generate

    return generate(args)


def _bench(args: argparse.Namespace) -> int:
    from job.commands.bench import bench

    return bench(args)


def _data_push(args: argparse.Namespace) -> int:
    from job.commands.data_push import push

    return push(args)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: train, generate, evaluate, promote, bench, data push."""
    parser = OneLineParser(prog="gan-job", description="Train the TensorFlow-tutorial DCGAN with Ray Train and PyTorch DDP.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train (or resume) a run on Ray Train", description="Train or resume a run.")
    _add_train_flags(train)
    train.set_defaults(handler=_train)

    generate = commands.add_parser("generate", help="images from a run's latest (or a given) checkpoint")
    generate.add_argument("--from", dest="source", required=True, help="run folder, checkpoint folder, or s3:// of either")
    generate.add_argument("--num", type=int, default=64, help="how many images (default 64)")
    generate.add_argument("--out", required=True, help="PNG grid of the first min(N, 64) images")
    generate.add_argument("--npy", help="also save all N images as an N x 28 x 28 float32 array in [-1, 1]")
    generate.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    generate.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    generate.set_defaults(handler=_generate)

    from job.commands.evaluate import add_evaluate_arguments
    from job.commands.promote import add_promote_arguments

    add_evaluate_arguments(commands.add_parser("evaluate", help="quality metrics of a run or checkpoint, as one JSON object"))
    add_promote_arguments(commands.add_parser("promote", help="point LATEST at a finished run if it is no worse than the current one"))

    bench = commands.add_parser("bench", help="time the training step on this machine (needs only PyTorch)")
    bench.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    bench.add_argument("--batch-size", type=int, default=256, help="batch size (default 256, as train)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    bench.add_argument("--data", choices=("mnist", "fashion-mnist"), default=None, help="real images instead of random ones")
    bench.add_argument("--data-dir", default=None, help="folder with the IDX files (with --data)")
    bench.add_argument("--noise-dim", type=int, default=100, help="noise vector length (default 100)")
    bench.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    bench.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help="as train's --precision (default auto)")
    bench.set_defaults(handler=_bench)

    data = commands.add_parser("data", help="manage the IDX files")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    push = data_commands.add_parser("push", help="upload the four IDX files to a bucket")
    push.add_argument("--data", choices=("mnist", "fashion-mnist"), required=True, help="dataset name")
    push.add_argument("--data-dir", default=None, help="where the files are (default: cache, system copy, download)")
    push.add_argument("--to", required=True, help="s3://bucket/prefix to upload to")
    push.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    push.set_defaults(handler=_data_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failed, 2 bad input, 3 `train --promote-to`: trained, promotion failed)."""
    from gan.data import DataError

    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except (UsageError, DataError) as err:
        message = " ".join(str(err).split())
        print(f"gan-job: error: {message}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print("gan-job: interrupted", file=sys.stderr)
        return 130


def main_entry() -> None:
    """The `gan-job` console script."""
    sys.exit(main())
