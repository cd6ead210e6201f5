"""What the server keeps on disk: per-round checkpoints (PEFT format), metrics, privacy report.

Layout under the run's out-dir::

    metrics.jsonl                  one line per round (round 0 = the initial adapter)
    privacy.json                   each site's latest accounting report
    checkpoints/round-NNNN/        adapter_config.json + adapter_model.safetensors + round.json
    final/adapter/                 the last global adapter, PEFT format
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.adapter import AdapterState, save_peft_adapter
from common.files import file_sha256, write_json


def append_metrics(out_dir: Path, line: dict[str, Any]) -> None:
    with open(out_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(line, default=_jsonable) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _jsonable(value: Any) -> Any:
    return float(value) if hasattr(value, "__float__") else str(value)


def save_checkpoint(out_dir: Path, server_round: int, model: torch.nn.Module, state: AdapterState,
                    info: dict[str, Any], seal: Callable[[Path], None] | None = None) -> Path:
    """Write round ``server_round``'s global adapter; returns its directory.

    Everything — weights, round.json, and whatever ``seal`` adds (the signed passport) — is
    written to a staging directory first and renamed into place: a crash never leaves half.
    """
    final = out_dir / "checkpoints" / f"round-{server_round:04d}"
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save_peft_adapter(model, state, staging)
    checksum = file_sha256(staging / "adapter_model.safetensors")
    write_json(staging / "round.json", {"round": server_round, "adapter_sha256": checksum, **info})
    if seal is not None:
        seal(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (a staging ``.tmp`` directory from a crash is ignored)."""
    done = sorted(p for p in (out_dir / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]") if (p / "round.json").exists())
    return done[-1] if done else None


def publish_final(out_dir: Path, checkpoint: Path) -> Path:
    target = out_dir / "final" / "adapter"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoint, target)
    return target
