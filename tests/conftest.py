"""Shared test setup: `gpu` tests skip without CUDA; every test runs with a fixed torch seed."""

import pytest
import torch

# The MLflow server and trained-model fixtures, shared by tests in several folders.
pytest_plugins = ("conftest_mlflow",)


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
