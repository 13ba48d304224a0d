"""Ray Train's harmless start-up timeout is dropped from the job's logs, and nothing else is (issue 12: "a
GetTimeoutError traceback at start, in a run that succeeds"; reproduced under load, see ray_logging.py)."""

from __future__ import annotations

import logging

import pytest
from ray.exceptions import GetTimeoutError
from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

from looplm.pipelines.training.ray_logging import DropRequestTimeouts, quiet_ray_train_start


@pytest.fixture
def quieted():
    logger = client.logger  # the logger Ray Train's autoscaling client really logs to
    before = list(logger.filters)
    quiet_ray_train_start()
    quiet_ray_train_start()  # a second setup call adds nothing
    yield logger
    logger.filters[:] = before


def _log_failure(logger: logging.Logger, error: Exception) -> None:
    try:
        raise error
    except Exception:
        logger.warning("Failed to send resource request for train-x.", exc_info=True)


def test_the_request_timeout_traceback_is_dropped_and_other_failures_are_kept(quieted, caplog):
    assert sum(isinstance(f, DropRequestTimeouts) for f in quieted.filters) == 1
    with caplog.at_level(logging.WARNING, logger=quieted.name):
        _log_failure(quieted, GetTimeoutError("Get timed out: some object(s) not ready."))
        _log_failure(quieted, RuntimeError("the coordinator actor died"))
    assert [r.exc_info[1].__class__.__name__ for r in caplog.records] == ["RuntimeError"]


def test_without_the_filter_the_timeout_is_logged_with_its_traceback(caplog):
    with caplog.at_level(logging.WARNING, logger=client.logger.name):
        _log_failure(client.logger, GetTimeoutError("Get timed out"))
    assert "GetTimeoutError" in caplog.text
