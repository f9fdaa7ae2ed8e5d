"""Shared fixtures. Unit tests run on CPU without root; integration tests carry markers (slow/root/gpu)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO
