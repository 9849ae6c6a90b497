import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own harness cache, so nothing leaks from a user's machine."""
    if "HARNESS_CACHE_KEEP" not in os.environ:
        monkeypatch.setenv("HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "harness-cache"))
    torch.manual_seed(0)


def pytest_configure(config):
    # Tiny models on a 2-core machine: one intra-op thread avoids oversubscription when the
    # suite or its subprocesses run side by side.
    torch.set_num_threads(1)
