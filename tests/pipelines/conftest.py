"""A local Ray on loopback for the curation tests that run Ray Data, started once per module that asks for it
and shut down after it (module scope, so tests in other modules that start their own Ray are not disturbed)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def local_ray():
    from looplm.infra.ray_cluster import ray_session

    with ray_session(num_cpus=2) as info:
        yield info
