"""Connect to Ray: the cluster at a given address or $RAY_ADDRESS, or else a local one bound to loopback.

    with ray_session() as info:        # a local Ray on 127.0.0.1, shut down on exit
        ...
    with ray_session("ray://head:10001"):   # an existing cluster, left running on exit
        ...

Ray 2.60 on Linux (see reference/ray-mlflow-notes.md §2): without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 a local
node binds its GCS and raylet on every interface; token auth turns itself on unless RAY_AUTH_MODE is explicit; and
`ray.init()` with no address auto-connects to whatever stale cluster file is on disk, so a local start always passes
address="local". Only what this module started is shut down, and never with `ray stop` (which kills by name).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Set before `import ray`: read when the local node picks its IP and when auth is configured.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Explicit, so a token file left by another run on this host does not turn auth on for us.
    "RAY_AUTH_MODE": "disabled",
}


@dataclass(frozen=True)
class RayInfo:
    address: str
    started_local: bool
    num_cpus: float


def _prepare_environment() -> None:
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    import ray._private.ray_constants as ray_constants

    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when ray is first imported; if something imported ray
    # before this module set it, bring the constant in line, or the node binds its outward IP after all.
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    include_dashboard: bool = False,
    object_store_memory: int | None = None,
    runtime_env: dict | None = None,
) -> RayInfo:
    """Join the cluster at `address` (or $RAY_ADDRESS); with neither, start a local Ray on 127.0.0.1.

    If Ray is already initialised in this process, that connection is reused as it is.
    """
    _prepare_environment()
    import ray

    if ray.is_initialized():
        return RayInfo(ray.get_runtime_context().gcs_address, False, ray.cluster_resources().get("CPU", 0.0))
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        if num_cpus is not None:
            raise ValueError("num_cpus applies only to a local Ray; a cluster at an address has its own")
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
        started = False
    else:
        dashboard_port = None
        if include_dashboard:
            # Ray Train's placement-group cleaner (a detached actor) finds the State API through RAY_API_SERVER_ADDRESS
            # or, without it, by looking for Ray on this host: with two local Rays (two jobs, parallel tests) that
            # fails ("Found multiple active Ray instances"), its monitor thread dies with a traceback in a run
            # that succeeds, and it cleans nothing up. So the dashboard gets a known port, named to our processes.
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                dashboard_port = probe.getsockname()[1]
            runtime_env = dict(runtime_env or {})
            runtime_env["env_vars"] = {
                **runtime_env.get("env_vars", {}),
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
            }
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=include_dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            object_store_memory=object_store_memory,
            runtime_env=runtime_env,
            logging_level="WARNING",
        )
        started = True
    return RayInfo(ray.get_runtime_context().gcs_address, started, ray.cluster_resources().get("CPU", 0.0))


def disconnect() -> None:
    """Shut down this process's Ray: a local one it started stops; from a cluster, the driver only detaches."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_session(address: str | None = None, **kwargs) -> Iterator[RayInfo]:
    """`connect`, then on exit shut down what this call started (a connection it reused is left alone)."""
    _prepare_environment()
    import ray

    reused = ray.is_initialized()
    info = connect(address, **kwargs)
    try:
        yield info
    finally:
        if not reused:
            disconnect()
