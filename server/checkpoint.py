"""What the server keeps on disk: per-round checkpoints (PEFT format), metrics, privacy report.

Layout under the run's out-dir (the run files' records: common/run_files.py)::

    metrics.jsonl                  one line per round (round 0 = the initial adapter)
    privacy.json                   each site's latest accounting report
    checkpoints/round-NNNN/        adapter_config.json + adapter_model.safetensors + round.json
                                   (+ server_optimizer.safetensors: its momentum, for a resume)
    final/adapter/                 the last global adapter, PEFT format
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from common.adapter import AdapterState, save_peft_adapter
from common.files import file_sha256
from common.run_files import MetricsLine, RoundInfo, checkpoint_name, read_round_info, write_round_info

OPTIMIZER_FILE = "server_optimizer.safetensors"


def save_checkpoint(out_dir: Path, server_round: int, model: torch.nn.Module, state: AdapterState, *,
                    contributors: int, parent_sha256: str | None, metrics: MetricsLine | None = None,
                    seal: Callable[[Path], None] | None = None,
                    optimizer_state: dict[str, np.ndarray] | None = None) -> Path:
    """Write round ``server_round``'s global adapter; returns its directory.

    Everything — weights, round.json, and whatever ``seal`` adds (the signed passport) — is
    written to a staging directory first and renamed into place: a crash never leaves half.
    """
    final = out_dir / "checkpoints" / checkpoint_name(server_round)
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save_peft_adapter(model, state, staging)
    optimizer_sha256 = None
    if optimizer_state:
        save_file(optimizer_state, str(staging / OPTIMIZER_FILE))
        optimizer_sha256 = file_sha256(staging / OPTIMIZER_FILE)
    write_round_info(staging, RoundInfo(server_round, file_sha256(staging / "adapter_model.safetensors"),
                                        contributors, parent_sha256, optimizer_sha256, metrics))
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
    if file_sha256(path) != read_round_info(checkpoint).server_optimizer_sha256:
        raise ValueError(f"{path} does not match its round.json checksum: it was altered")
    return load_file(str(path))


def publish_final(out_dir: Path, checkpoint: Path) -> Path:
    target = out_dir / "final" / "adapter"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoint, target)
    return target
