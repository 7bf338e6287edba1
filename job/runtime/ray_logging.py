"""Ray Train's console, quieted where it only repeats what the project prints.

Ray Train 2.60 logs every `report` on every rank ("Reporting training result N: TrainingReport(...)",
the whole metrics dict) through `logging.getLogger(__file__)` in its execution context module: a
logger named by that file's path, which Ray's `TrainLogLevelFilter` never filters. Its level is
raised in the worker's entry point; its warnings (a slow checkpoint upload) still show. So is
matplotlib's font cache notice ("generated new fontManager", at INFO on a machine's first use), which
torchmetrics' import of pyplot brings onto a worker's console. A streamed run's worker also drops Ray Data's
notices (that progress bars are off, that an execution ended: a shard is one execution, its end the run's).
"""

from __future__ import annotations

import importlib
import logging

REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"  # logs each report at INFO
FONT_CACHE_LOGGER = "matplotlib.font_manager"
RAY_DATA_LOGGER = "ray.data"
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"  # says at WARNING that the bars are off, as we asked


def report_logger() -> logging.Logger:
    """The logger Ray Train's per-report line goes through (named by its module's file path)."""
    module = importlib.import_module(REPORT_LOGGER_MODULE)  # why: Ray is imported only on its workers
    return logging.getLogger(module.__file__)


def quiet_ray_train_reports() -> None:
    """Drop Ray Train's per-report INFO line (and matplotlib's font cache notice) on this worker; keep warnings."""
    report_logger().setLevel(logging.WARNING)
    logging.getLogger(FONT_CACHE_LOGGER).setLevel(logging.WARNING)


def quiet_ray_data() -> None:
    """Drop Ray Data's notices on this worker; keep its warnings. Called once ray.data is imported: its import
    configures its own loggers."""
    logging.getLogger(RAY_DATA_LOGGER).setLevel(logging.WARNING)
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
