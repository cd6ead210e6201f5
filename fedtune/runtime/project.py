"""Where the Flower app lives, and the error a run that did not complete raises (light: the CLI imports it
before it knows whether a command runs Flower)."""

from __future__ import annotations

from pathlib import Path


class RunFailed(RuntimeError):
    """The federated run did not complete; ``log_path`` holds Flower's log of the run, if any."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


def project_dir() -> Path:
    """The Flower app directory (holds pyproject.toml with [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise RunFailed(f"no pyproject.toml in {root}: install fedtune from its source tree (pip install -e .)")
    return root
