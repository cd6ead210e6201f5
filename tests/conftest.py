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


LIBRARY_PROBES = (["uname"], ["fc-list"])
"""Commands libraries run to describe the machine: ``platform.processor()`` runs ``uname -p``; matplotlib lists the
system's fonts with ``fc-list`` once, to build its font cache on a fresh machine."""


class UnmarkedTier(AssertionError):
    """A test does what only a marked tier may: `make test-fast` runs the unmarked tests alone."""


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit tier stays fast by construction: an unmarked test that loads pre-trained weights or starts a
    process fails, naming the marker it needs (tiny models built in the test need neither)."""
    import multiprocessing.process
    import subprocess

    import common.model

    name = request.node.nodeid
    if request.node.get_closest_marker("model") is None and request.node.get_closest_marker("slow") is None:
        def refuse_weights(path, *args, **kwargs):
            raise UnmarkedTier(f"{name} loads the model weights in {path}: mark it @pytest.mark.model")
        monkeypatch.setattr(common.model, "_base_model", refuse_weights)
        monkeypatch.setattr(common.model, "_pristine_model", refuse_weights)  # cached: loaded by an earlier test
    if request.node.get_closest_marker("process") is None and request.node.get_closest_marker("slow") is None:
        popen = subprocess.Popen.__init__

        def refuse_process(self, args, *more, **kwargs):
            if [*args][:1] in LIBRARY_PROBES:  # a library asking the OS about the machine, not a test's process
                return popen(self, args, *more, **kwargs)
            raise UnmarkedTier(f"{name} starts a process ({args!r:.80}): mark it @pytest.mark.process")
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse_process)
        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                            lambda self: refuse_process(self, [f"multiprocessing: {self.name}"]))


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
