import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own harness cache, so nothing leaks from a user's machine."""
    if "HARNESS_CACHE_KEEP" not in os.environ:
        monkeypatch.setenv("HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "harness-cache"))
    torch.manual_seed(0)
