"""Ray Train's per-report log line is silenced at its source logger, whose name is pinned here."""

from __future__ import annotations

import importlib
import inspect
import logging

from job.runtime.ray_logging import REPORT_LOGGER_MODULE, quiet_ray_train_reports, report_logger


def test_ray_logs_each_report_through_the_logger_named_by_its_file_path():
    """Fails when a Ray upgrade moves the line or renames its logger: then the silencing misses it."""
    module = importlib.import_module(REPORT_LOGGER_MODULE)
    assert "Reporting training result" in inspect.getsource(module)
    assert module.logger is report_logger() and module.logger.name == module.__file__


def test_quieting_drops_the_report_line_and_keeps_warnings():
    logger = report_logger()
    before = logger.level
    try:
        logger.setLevel(logging.INFO)  # as a worker that logs at INFO would have it
        assert logger.isEnabledFor(logging.INFO)
        quiet_ray_train_reports()
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(before)
