"""Shared fixtures. Unit tests run on CPU without root; integration tests carry markers (slow/root/gpu).

``report`` collects what robustness and regression tests tried and what held; it is printed at the end of the
run (pytest_terminal_summary), so CI logs carry the figures.
"""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPORT = pytest.StashKey[list]()


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def report(request):
    lines = request.config.stash.setdefault(REPORT, [])
    return lines.append


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(REPORT, [])
    if lines:
        terminalreporter.section("compactbed report: what was tried, what held")
        for line in lines:
            terminalreporter.write_line(line)
