"""The `train` command: a run on Ray Train, as Ray's own examples drive one (a trainer, then `fit`), through the
driver (`job.runtime.driver`); with `--promote-to` the finished run is promoted as `gan-job promote` would."""

from __future__ import annotations

from job.config import TrainConfig
from job.promotion.gate import Promotion, check_run_beside, check_target, promote_after_training
from job.runtime import driver


def run_training(config: TrainConfig, promotion: Promotion | None = None) -> int:
    """Train `config` on Ray Train, then promote the run if `promotion` says so.

    0 when training finished (and the promotion, if any, was made or declined); `RunFailed` (exit 1) when training
    failed; bad input is refused before any Ray work (exit 2); PROMOTION_FAILED (3) when training finished but its
    promotion failed.
    """
    target = promotion.check(config.s3_endpoint) if promotion is not None else None
    run = driver.check(config)
    if target is not None:
        check_run_beside(run.run, target, flag="--promote-to")
        check_target(target, run.config.s3_endpoint, flag="--promote-to")  # a LATEST that is no pointer, a store
    run = driver.launch(run)
    trainer = driver.build_trainer(run)
    driver.say_training(run)
    driver.fit(trainer, run)
    print(f"run {run.config.run_name} finished: checkpoints and artifacts in {run.run.uri}", flush=True)
    if promotion is None:
        return 0
    config = run.config
    return promote_after_training(
        run.run, config.run_name, target, promotion.margin, config.data_dir, config.s3_endpoint
    )
