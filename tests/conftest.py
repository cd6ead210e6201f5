"""Shared fixtures: small real data, and the path to the bank data when ../shared has it."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
BANKING77 = ROOT.parent / "shared" / "data" / "banking77"


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


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
