"""What the server keeps on disk: per-round checkpoints (PEFT format), metrics, privacy report.

Layout under the run's out-dir::

    metrics.jsonl                  one line per round (round 0 = the initial adapter)
    privacy.json                   each site's latest accounting report
    checkpoints/round-NNNN/        adapter_config.json + adapter_model.safetensors + round.json
                                   (+ server_optimizer.safetensors: its momentum, for a resume)
    final/adapter/                 the last global adapter, PEFT format
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from common.adapter import AdapterState, save_peft_adapter
from common.files import file_sha256, write_json

OPTIMIZER_FILE = "server_optimizer.safetensors"


def append_metrics(out_dir: Path, line: dict[str, Any]) -> None:
    with open(out_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(line, default=_jsonable) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _jsonable(value: Any) -> Any:
    return float(value) if hasattr(value, "__float__") else str(value)


def save_checkpoint(out_dir: Path, server_round: int, model: torch.nn.Module, state: AdapterState,
                    info: dict[str, Any], seal: Callable[[Path], None] | None = None,
                    optimizer_state: dict[str, np.ndarray] | None = None) -> Path:
    """Write round ``server_round``'s global adapter; returns its directory.

    Everything — weights, round.json, and whatever ``seal`` adds (the signed passport) — is
    written to a staging directory first and renamed into place: a crash never leaves half.
    """
    final = out_dir / "checkpoints" / f"round-{server_round:04d}"
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save_peft_adapter(model, state, staging)
    checksum = file_sha256(staging / "adapter_model.safetensors")
    extra = {}
    if optimizer_state:
        save_file(optimizer_state, str(staging / OPTIMIZER_FILE))
        extra["server_optimizer_sha256"] = file_sha256(staging / OPTIMIZER_FILE)
    write_json(staging / "round.json", {"round": server_round, "adapter_sha256": checksum, **extra, **info})
    if seal is not None:
        seal(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def load_optimizer_state(checkpoint: Path) -> dict[str, np.ndarray] | None:
    """The server optimizer's state saved with ``checkpoint`` (None for FedAvg, which has none)."""
    path = checkpoint / OPTIMIZER_FILE
    if not path.exists():
        return None
    expected = json.loads((checkpoint / "round.json").read_text()).get("server_optimizer_sha256")
    if file_sha256(path) != expected:
        raise ValueError(f"{path} does not match its round.json checksum: it was altered")
    return load_file(str(path))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (a staging ``.tmp`` directory from a crash is ignored)."""
    rounds = (out_dir / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]")
    done = sorted(p for p in rounds if (p / "round.json").exists())
    return done[-1] if done else None


def publish_final(out_dir: Path, checkpoint: Path) -> Path:
    target = out_dir / "final" / "adapter"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoint, target)
    return target
