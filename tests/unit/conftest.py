"""Fixtures of the ledger tests (test_ledger.py, test_plans.py): every one runs on both backends."""

from __future__ import annotations

import pytest

from factory.metering.ledger import Ledger


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    """Where the test's ledger lives: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture()
def ledger(target):
    led = Ledger(target)
    yield led
    led.close()
