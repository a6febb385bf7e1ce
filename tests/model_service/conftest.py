"""Fixtures of the model store tests: store subprocesses that are always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import StoreProcess


@pytest.fixture
def store_processes() -> Iterator[list[StoreProcess]]:
    """Every StoreProcess a test appends is killed at the end, whatever happened."""
    processes: list[StoreProcess] = []
    try:
        yield processes
    finally:
        for process in processes:
            process.close()
