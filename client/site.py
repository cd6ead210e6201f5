"""Who this site is and what data it holds, from Flower's node config.

Deployment: ``fedtune client start`` gives the SuperNode ``site-name``, ``data-path``,
``state-dir``, ``kit-dir`` and the site's ``max-epsilon`` in its node config (the data file never
leaves the site; the site's policy is its own, not the coordinator's). Simulation: Flower gives ``partition-id`` and
``num-partitions``; the site takes its seeded partition of the shared source and keeps its
ledger under the run's output directory.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from common.config import ConfigError, DataSettings, RunSettings
from common.data import EncodedData, Record, encode, partition, read_records, split_holdout
from common.model import load_tokenizer

HOLDOUT_FRACTION = 0.2


class PolicyError(RuntimeError):
    """The run asks for less protection than this site's own policy allows."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts, set by the site (node config), never by the coordinator's run config."""

    max_epsilon: float | None = None
    require_dp: bool = True
    require_secure_aggregation: bool = True

    def check(self, settings: RunSettings) -> None:
        if self.require_dp and not settings.privacy.enabled:
            raise PolicyError("the run turns differential privacy off; this site requires DP")
        if self.max_epsilon is not None and settings.privacy.epsilon > self.max_epsilon:
            raise PolicyError(f"the run asks for a budget ε={settings.privacy.epsilon:g}; this site allows at most "
                              f"ε={self.max_epsilon:g}")
        if self.require_secure_aggregation and not settings.federation.secure_aggregation:
            raise PolicyError("the run turns secure aggregation off; this site requires it")


@dataclass(frozen=True)
class Site:
    name: str
    state_dir: Path
    labels: tuple[str, ...]
    train: EncodedData
    holdout: EncodedData
    keys_dir: Path
    """Where the site's identity key is: its startup kit (deployment) or its state dir (simulation)."""
    registry_path: Path | None = None
    """The site's own copy of the registry (deployment); None = the run config's (simulation)."""
    policy: SitePolicy = SitePolicy(require_dp=False, require_secure_aggregation=False)

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy-ledger.json"


def resolve_site(node_config: Mapping[str, Any], settings: RunSettings) -> Site:
    if not settings.data.labels:
        raise ConfigError("data.labels must list the federation's labels (the run config sets it for every site)")
    if "data-path" in node_config:
        return _deployed_site(node_config, settings)
    if "partition-id" in node_config:
        return _simulated_site(int(node_config["partition-id"]), int(node_config["num-partitions"]), settings)
    raise ConfigError("node config names neither data-path (deployment) nor partition-id (simulation)")


def _deployed_site(node_config: Mapping[str, Any], settings: RunSettings) -> Site:
    missing = [k for k in ("site-name", "state-dir", "kit-dir") if not node_config.get(k)]
    if missing:
        raise ConfigError(f"a deployed site needs {missing} in its node config (fedtune client start sets them)")
    kit = Path(str(node_config["kit-dir"]))
    max_epsilon = float(node_config["max-epsilon"]) if node_config.get("max-epsilon") else None
    site = _encode_site(str(node_config["site-name"]), Path(str(node_config["state-dir"])),
                        read_records(str(node_config["data-path"])), settings, labels=settings.data.labels,
                        seed=settings.data.seed, keys_dir=kit)
    return dataclasses.replace(site, registry_path=kit / "registry.json", policy=SitePolicy(max_epsilon=max_epsilon))


def _simulated_site(partition_id: int, num_partitions: int, settings: RunSettings) -> Site:
    records, parts = _simulation_partitions(settings.data, num_partitions)
    mine = [records[i] for i in parts[partition_id]]
    name = f"site-{partition_id}"
    state_dir = settings.out_dir.resolve() / "sites" / name
    return _encode_site(name, state_dir, mine, settings, labels=settings.data.labels,
                        seed=settings.data.seed + partition_id, keys_dir=state_dir)


@functools.lru_cache(maxsize=2)
def _simulation_partitions(data: DataSettings, sites: int) -> tuple[list[Record], list[list[int]]]:
    records = read_records(data.source)
    return records, partition(records, sites, data.partition, alpha=data.dirichlet_alpha, seed=data.seed)


def _encode_site(name: str, state_dir: Path, records: list[Record], settings: RunSettings,
                 *, labels: tuple[str, ...], seed: int, keys_dir: Path) -> Site:
    train_idx, holdout_idx = split_holdout(list(range(len(records))), HOLDOUT_FRACTION, seed)
    tokenizer = load_tokenizer(settings.model_path)
    where = f"site {name}"
    max_length = settings.data.max_length
    return Site(
        name=name,
        state_dir=state_dir,
        labels=labels,
        keys_dir=keys_dir,
        train=encode([records[i] for i in train_idx], labels, tokenizer, max_length, where),
        holdout=encode([records[i] for i in holdout_idx], labels, tokenizer, max_length, where),
    )
