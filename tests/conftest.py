"""Real-size checks (`@pytest.mark.slow`) take minutes and gigabytes: they run on demand, with IMAGEN_SLOW_TESTS=1
(`IMAGEN_SLOW_TESTS=1 .venv/bin/python -m pytest -m slow`), and are skipped, saying so, otherwise."""

from __future__ import annotations

import os

import pytest

SLOW_ENV = "IMAGEN_SLOW_TESTS"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"a real-size check: run it with {SLOW_ENV}=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
