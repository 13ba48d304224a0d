"""infra/ray_cluster.py: a local Ray on loopback that shuts down on exit, and reuse of a live connection."""

import os

import pytest

from looplm.infra.ray_cluster import connect, ray_session


@pytest.mark.slow
def test_local_session_binds_loopback_runs_tasks_and_shuts_down():
    import ray

    assert not ray.is_initialized()
    with ray_session(num_cpus=1) as info:
        assert info.started_local
        assert info.num_cpus == 1.0
        assert info.address.startswith("127.0.0.1:")  # GCS on loopback, not the outward IP
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
        assert os.environ["RAY_AUTH_MODE"] in ("disabled", "token")

        @ray.remote
        def square(x):
            return x * x

        assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
        # A nested session reuses the connection and must not shut it down on exit.
        with ray_session() as inner:
            assert not inner.started_local
        assert ray.is_initialized()
    assert not ray.is_initialized()


def test_cluster_address_rejects_local_only_options(monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.skip("needs no live Ray connection")
    with pytest.raises(ValueError, match="num_cpus applies only to a local Ray"):
        connect("127.0.0.1:1", num_cpus=2)
