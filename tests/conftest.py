"""Shared fixtures: small real data, the path to the bank data when ../shared has it, the processes a test starts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.data import write_records as write_csv
from tests.processes import ProcessFamily

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
BANKING77 = ROOT.parent / "shared" / "data" / "banking77"


@pytest.fixture(scope="session")
def drug_reviews() -> list[dict[str, str]]:
    from common.data import read_records

    return read_records("drugreview")


@pytest.fixture()
def tiny_csv(tmp_path: Path, drug_reviews) -> Path:
    """36 real drug reviews with text, label and condition columns."""
    return write_csv(tmp_path / "reviews.csv", drug_reviews[:36])


@pytest.fixture(scope="session")
def banking77() -> Path:
    if not (BANKING77 / "train.csv").is_file():
        pytest.skip(f"bank data not present at {BANKING77} (only on the team's machines)")
    return BANKING77


@pytest.fixture()
def started_processes() -> Iterator[ProcessFamily]:
    """What the test starts through it (and everything below): stopped after the test, whatever happened."""
    family = ProcessFamily()
    yield family
    family.stop()
