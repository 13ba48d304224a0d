"""Shared test setup: `gpu` tests skip without CUDA; every test runs with a fixed torch seed; runs that the
tracker spills during an MLflow outage go to the session's temporary folder, never to the user's ~/.cache."""

import os
import shutil
import tempfile

import pytest
import torch

# The MLflow server and trained-model fixtures, shared by tests in several folders.
pytest_plugins = ("conftest_mlflow",)


def pytest_configure(config):
    # Before any fixture starts Ray or a subprocess, so that every process of the session inherits it.
    if "LOOPLM_TRACKING_SPILL_DIR" not in os.environ:
        config._looplm_spill = os.environ["LOOPLM_TRACKING_SPILL_DIR"] = tempfile.mkdtemp(prefix="looplm-test-spill-")


def pytest_unconfigure(config):
    if hasattr(config, "_looplm_spill"):
        shutil.rmtree(config._looplm_spill, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
