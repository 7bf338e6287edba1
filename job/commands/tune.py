"""The `tune` command: a sweep of `train` runs on Ray Tune, ranked by the classifier FID (`job.sweep`).

As `train`, it goes through the driver (`job.runtime.driver`): everything it can check is checked before any Ray
work (the space, the data of each searched dataset, the storage, a resumed sweep's flags and sealed Tune state, the
promotion target); then it places one trial, starts (or restores) the Tuner, re-scores the best finished trials
with `evaluate`'s protocol and writes what the sweep found. Why: docs/tune.md
"""

from __future__ import annotations

import argparse
import dataclasses

from job.config import TrainConfig
from job.errors import UsageError
from job.promotion.gate import Promotion, check_run_beside, check_target
from job.runtime import driver
from job.runtime.interrupts import in_own_thread
from job.settings import EVAL_NUM, MAX_EPOCHS, MAX_WORKERS, Setting
from job.sweep.outcome import conclude
from job.sweep.space import MAX_TRIALS, with_absolute_data
from job.sweep.spec import SPEC_FILE, SweepArgs, check_same, check_sweep, read_spec, spec_of
from job.sweep.trial import TRIAL_DRIVER_RESOURCE, TrialPlan
from job.sweep.tuner import LOCAL_DRIVER_SLOTS, RUNS_FOLDER, build_tuner, check_driver_resource, check_tune_state

SCHEDULERS = ("fifo", "asha", "pbt")
SWEEP = Setting("the sweep's name: its folder in --storage; the same name again resumes the sweep", str, metavar="NAME")
TRIALS = Setting(
    "Tune's num_samples: the sampled dimensions are drawn N times for each grid point",
    int,
    low=1,
    high=MAX_TRIALS,
    metavar="N",
)
SPACE = Setting(
    "one searched train setting, repeatable: lr=log:1e-5:1e-3, lr=uniform:1e-5:1e-3, beta1=0,0.5,0.9 "
    "(a comma list is a grid)",
    str,
    metavar="NAME=SPEC",
)
SCHEDULER = Setting(
    "asha stops weak trials early on the epoch's FID; pbt exploits and mutates lr and beta1; fifo runs every trial "
    "to the end",
    str,
    choices=SCHEDULERS,
)
MAX_CONCURRENT = Setting("trials that train at once (each one worker group)", int, low=1, high=MAX_WORKERS, metavar="K")
PERTURBATION_INTERVAL = Setting(
    "pbt: epochs per segment, between the chances to exploit", int, low=1, high=MAX_EPOCHS, metavar="EPOCHS"
)
FINAL_EVAL_NUM = dataclasses.replace(
    EVAL_NUM, help="images of the final evaluation of the best three finished trials (evaluate's --num)", metavar="N"
)


def run_tune(args: SweepArgs, config: TrainConfig, promotion: Promotion | None = None) -> int:
    """`gan-job tune`: 0 when the sweep ran (trials may have failed: results.csv says which), 1 when no trial
    finished, 2 on bad input, 3 when the winner's promotion failed."""
    spec = spec_of(args, config)  # as given: the flags a resume is compared with
    dimensions, variants = check_sweep(args, config)
    dimensions = with_absolute_data(dimensions)
    target = promotion.check(config.s3_endpoint) if promotion is not None else None
    sweep = driver.check(config.replace(run_name=args.sweep), variants, name_flag="--sweep")
    stored = read_spec(sweep.run)
    if stored is not None:
        check_same(spec, stored)
    check_tune_state(args, sweep.run)
    if target is not None:
        check_run_beside(sweep.run.child(RUNS_FOLDER, "trial"), target, flag="--promote-to")  # where the winner goes
        check_target(target, sweep.config.s3_endpoint, flag="--promote-to")
    sweep = driver.launch(sweep, resources={TRIAL_DRIVER_RESOURCE: LOCAL_DRIVER_SLOTS})  # one trial's workers placed
    check_driver_resource()
    if stored is None:
        sweep.run.child(SPEC_FILE).write_text(spec.to_json())
    plan = TrialPlan(
        sweep.config.to_dict(), sweep.run.child(RUNS_FOLDER), args.scheduler, args.perturbation_interval, sweep.data
    )
    print(
        f"sweep {args.sweep}: {args.scheduler}, {args.trials} sample(s) of {' '.join(args.space) or '(no space)'}, "
        f"{args.max_concurrent} at once, {sweep.config.epochs} epochs each; storage {sweep.run.uri}",
        flush=True,
    )
    tuner = build_tuner(args, dimensions, plan, sweep.run)
    results = in_own_thread(tuner.fit, "gan-job-tune")  # where Tune installs no SIGINT handler of its own
    promoting = (target, promotion.margin) if promotion is not None else None
    return conclude(results, args, dimensions, plan, sweep.run, promoting)


def sweep_args(args: argparse.Namespace) -> SweepArgs:
    """The sweep's flags out of the parsed command line; `train` flags a sweep sets itself are refused."""
    if args.run_name is not None:
        raise UsageError("--run-name is set by the sweep (each trial is runs/<trial>); drop it and name the --sweep")
    if args.eval_every not in (None, 1):
        raise UsageError("--eval-every is 1 in a sweep (every epoch is scored); drop it")
    if args.checkpoint_every_steps is not None:
        raise UsageError(
            "--checkpoint-every-steps is for train: a trial reports to its scheduler at the ends of epochs; drop it"
        )
    return SweepArgs(
        sweep=args.sweep,
        space=list(args.space or []),
        trials=args.trials,
        scheduler=args.scheduler,
        max_concurrent=args.max_concurrent,
        perturbation_interval=args.perturbation_interval,
        final_eval_num=args.final_eval_num,
    )
