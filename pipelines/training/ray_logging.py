"""Ray Train's harmless start-up noise, filtered where it is logged, in the job's own processes (Ray 2.60).

At the start of every run, Ray Train's controller registers the worker group's resources with its autoscaling
coordinator, an actor it creates on first use, and waits 5 s for the answer
(`ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py`). On a busy machine the
actor's process is still starting after 5 s: the controller logs a warning with a full `GetTimeoutError`
traceback, then trains normally and sends the request again 20 s later. A local Ray has no autoscaler to read the
request at all. `quiet_ray_train_start` (the job's `worker_process_setup_hook`, so it runs in the controller's
process) drops exactly those records: that logger, that exception. Any other failure of the request is still
logged, with its traceback.
"""

from __future__ import annotations

import logging

AUTOSCALING_CLIENT_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


class DropRequestTimeouts(logging.Filter):
    """Drops records whose exception is a GetTimeoutError (the coordinator's answer came after 5 s)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ray.exceptions import GetTimeoutError

        return not (record.exc_info and isinstance(record.exc_info[1], GetTimeoutError))


def quiet_ray_train_start() -> None:
    """Install the filter on the autoscaling client's logger (once per process)."""
    logger = logging.getLogger(AUTOSCALING_CLIENT_LOGGER)
    if not any(isinstance(f, DropRequestTimeouts) for f in logger.filters):
        logger.addFilter(DropRequestTimeouts())
