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


SYSTEM_MARKERS = ("browser", "slurm", "system")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With HARNESS_REQUIRE_SYSTEM=1 (set by .ci/run, which installs chromium, poppler and Slurm),
    a browser, PDF or Slurm test that skips for a missing tool fails instead."""
    outcome = yield
    report = outcome.get_result()
    required = os.environ.get("HARNESS_REQUIRE_SYSTEM") == "1"
    if required and report.skipped and any(item.get_closest_marker(m) for m in SYSTEM_MARKERS):
        report.outcome = "failed"
        report.longrepr = f"HARNESS_REQUIRE_SYSTEM=1 but the test skipped: {report.longrepr}"


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: `-n 2 --dist loadgroup`): a file's tests stay on one worker, so its
    module fixtures run once, and every Slurm test shares one worker, since the local cluster has one node
    and its tests time their jobs."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
