"""Ray Train's console, quieted where it only repeats what the project prints.

Ray Train 2.60 logs every `report` on every rank ("Reporting training result N: TrainingReport(...)",
the whole metrics dict) through `logging.getLogger(__file__)` in its execution context module: a
logger named by that file's path, which Ray's `TrainLogLevelFilter` never filters. Its level is
raised in the worker's entry point; its warnings (a slow checkpoint upload) still show. So is
matplotlib's font cache notice ("generated new fontManager", at INFO on a machine's first use), which
torchmetrics' import of pyplot brings onto a worker's console.
"""

from __future__ import annotations

import importlib
import logging

REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"  # logs each report at INFO
FONT_CACHE_LOGGER = "matplotlib.font_manager"


def report_logger() -> logging.Logger:
    """The logger Ray Train's per-report line goes through (named by its module's file path)."""
    module = importlib.import_module(REPORT_LOGGER_MODULE)  # why: Ray is imported only on its workers
    return logging.getLogger(module.__file__)


def quiet_ray_train_reports() -> None:
    """Drop Ray Train's per-report INFO line (and matplotlib's font cache notice) on this worker; keep warnings."""
    report_logger().setLevel(logging.WARNING)
    logging.getLogger(FONT_CACHE_LOGGER).setLevel(logging.WARNING)
