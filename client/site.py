"""Who this site is and what data it holds, from Flower's node config.

Deployment: the SuperNode is started with ``site-name``, ``data-path`` and ``state-dir`` in its
node config (the data file never leaves the site). Simulation: Flower gives ``partition-id`` and
``num-partitions``; the site takes its seeded partition of the shared source and keeps its
ledger under the run's output directory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from common.config import ConfigError, DataSettings, RunSettings
from common.data import EncodedData, Record, encode, partition, read_records, split_holdout
from common.model import load_tokenizer

HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Site:
    name: str
    state_dir: Path
    labels: tuple[str, ...]
    train: EncodedData
    holdout: EncodedData

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy-ledger.json"


def resolve_site(node_config: Mapping[str, Any], settings: RunSettings) -> Site:
    if not settings.data.labels:
        raise ConfigError("data.labels must list the federation's labels (the run config sets it for every site)")
    if "data-path" in node_config:
        return _deployed_site(str(node_config.get("site-name", "")), str(node_config["data-path"]),
                              str(node_config.get("state-dir", "")), settings)
    if "partition-id" in node_config:
        return _simulated_site(int(node_config["partition-id"]), int(node_config["num-partitions"]), settings)
    raise ConfigError("node config names neither data-path (deployment) nor partition-id (simulation)")


def _deployed_site(name: str, data_path: str, state_dir: str, settings: RunSettings) -> Site:
    if not name or not state_dir:
        raise ConfigError("a deployed site needs site-name and state-dir in its node config")
    records = read_records(data_path)
    return _encode_site(name, Path(state_dir), records, settings, labels=settings.data.labels, seed=settings.data.seed)


def _simulated_site(partition_id: int, num_partitions: int, settings: RunSettings) -> Site:
    records, parts = _simulation_partitions(settings.data, num_partitions)
    mine = [records[i] for i in parts[partition_id]]
    name = f"site-{partition_id}"
    state_dir = settings.out_dir.resolve() / "sites" / name
    return _encode_site(name, state_dir, mine, settings, labels=settings.data.labels,
                        seed=settings.data.seed + partition_id)


@functools.lru_cache(maxsize=2)
def _simulation_partitions(data: DataSettings, sites: int) -> tuple[list[Record], list[list[int]]]:
    records = read_records(data.source)
    return records, partition(records, sites, data.partition, alpha=data.dirichlet_alpha, seed=data.seed)


def _encode_site(name: str, state_dir: Path, records: list[Record], settings: RunSettings,
                 *, labels: tuple[str, ...], seed: int) -> Site:
    train_idx, holdout_idx = split_holdout(list(range(len(records))), HOLDOUT_FRACTION, seed)
    tokenizer = load_tokenizer(settings.model_path)
    where = f"site {name}"
    max_length = settings.data.max_length
    return Site(
        name=name,
        state_dir=state_dir,
        labels=labels,
        train=encode([records[i] for i in train_idx], labels, tokenizer, max_length, where),
        holdout=encode([records[i] for i in holdout_idx], labels, tokenizer, max_length, where),
    )
