"""Who this site is, what data it holds, and what it accepts: its own policy, never the coordinator's.

Deployment: ``fedtune client start`` gives the SuperNode ``site-name``, ``data-path``,
``state-dir``, ``keys-dir`` and the site's policy flags (``policy.*`` keys) in its node config;
the data file never leaves the site. Simulation: Flower gives ``partition-id`` and
``num-partitions``; the site takes its seeded partition of the shared source, keeps its state
under the run's output directory, and reads its policy from ``policy.json`` there (written by
``fedtune simulate``, which plays every site). Both build the same :class:`SitePolicy`. Either
way the site's peers are the members pinned in its state dir (common.registry.load_members).

A site's records train, except its evaluation split (client.site_eval): units it holds out once, which never
train and are only scored, with their own DP budget (there is no hold-out outside a DP guarantee).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.policy import POLICY_FILE, SitePolicy
from client.privacy import LEDGER_FILE
from client.site_eval import split_for_evaluation
from common.config import ConfigError, DataSettings, RunSettings, TaskKind, unit_column
from common.data import DataError, Record, partition, read_records
from common.encoding import EncodedData, encode
from common.files import private_dir
from common.model import load_tokenizer
from common.passport import PASSPORT_PUB

log = logging.getLogger("fedtune.client")
@dataclass(frozen=True)
class Site:
    name: str
    state_dir: Path
    labels: tuple[str, ...]
    train: EncodedData
    keys_dir: Path
    """Where the site's identity key is: its own key directory (deployment) or its state dir (simulation)."""
    policy: SitePolicy
    evaluation: EncodedData | None = None
    """The site's evaluation split (client.site_eval): units that never train; None without one."""
    receipts_dir: Path | None = None
    """Where the coordinator's receipts of its charges are kept, outside the state dir; None = beside it
    (common.files.default_receipts_dir)."""
    passport_key: Path | None = None
    """The federation's passport-signing.pub, which signs those receipts (the kit's; the simulation's own)."""

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER_FILE


def resolve_site(node_config: Mapping[str, Any], settings: RunSettings) -> Site:
    if settings.task == "classification" and not settings.data.labels:
        raise ConfigError("data.labels must list the federation's labels (the run config sets it for every site)")
    if "data-path" in node_config:
        site = _deployed_site(node_config, settings)
    elif "partition-id" in node_config:
        site = _simulated_site(int(node_config["partition-id"]), int(node_config["num-partitions"]), settings)
    else:
        raise ConfigError("node config names neither data-path (deployment) nor partition-id (simulation)")
    private_dir(site.state_dir)
    if weakened := site.policy.weakened():
        log.warning("SITE POLICY OF %s ACCEPTS WEAKER PROTECTION: %s off", site.name, ", ".join(weakened))
    return site


def site_keys_dir(node_config: Mapping[str, Any]) -> Path:
    """The site's own key folder, of a deployed site. (Its peers come from the member list pinned in
    its state dir, never from the kit's registry.)"""
    missing = [k for k in ("site-name", "state-dir", "keys-dir") if not node_config.get(k)]
    if missing:
        raise ConfigError(f"a deployed site needs {missing} in its node config (fedtune client start sets them)")
    return Path(str(node_config["keys-dir"]))


def _deployed_site(node_config: Mapping[str, Any], settings: RunSettings) -> Site:
    keys_dir = site_keys_dir(node_config)
    policy = SitePolicy.from_mapping({k.removeprefix("policy."): v for k, v in node_config.items()
                                      if k.startswith("policy.")}, "node config")
    policy.check_task(settings)  # before the records are read
    site = _encode_site(str(node_config["site-name"]), Path(str(node_config["state-dir"])),
                        read_records(str(node_config["data-path"]), task=policy.task), settings, policy=policy,
                        keys_dir=keys_dir)
    receipts = Path(str(node_config["receipts-dir"])) if node_config.get("receipts-dir") else None
    return dataclasses.replace(site, receipts_dir=receipts,
                               passport_key=Path(str(node_config["kit-dir"])) / PASSPORT_PUB)


def _simulated_site(partition_id: int, num_partitions: int, settings: RunSettings) -> Site:
    name = f"site-{partition_id}"
    state_dir = settings.out_dir.resolve() / "sites" / name
    policy_path = state_dir / POLICY_FILE
    try:
        policy = (SitePolicy.from_mapping(json.loads(policy_path.read_text()), str(policy_path))
                  if policy_path.exists() else SitePolicy())
    except ValueError as exc:
        raise ConfigError(f"site policy {policy_path} is unreadable ({exc}); fix or delete it") from exc
    policy.check_task(settings)
    records, parts = simulation_partitions(settings.data, num_partitions, policy.task)
    mine = [records[i] for i in parts[partition_id]]
    site = _encode_site(name, state_dir, mine, settings, policy=policy, keys_dir=state_dir)
    return dataclasses.replace(site, passport_key=settings.out_dir.resolve() / PASSPORT_PUB)


@functools.lru_cache(maxsize=2)
def simulation_partitions(data: DataSettings, sites: int, task: TaskKind) -> tuple[list[Record], list[list[int]]]:
    records = read_records(data.source, task=task)
    return records, partition(records, sites, data.partition, alpha=data.dirichlet_alpha, seed=data.seed)


def _encode_site(name: str, state_dir: Path, records: list[Record], settings: RunSettings,
                 *, policy: SitePolicy, keys_dir: Path) -> Site:
    tokenizer = load_tokenizer(policy.model_path)  # the site's own task, labels and model read its records
    training, held_out = split_for_evaluation(records, policy, settings, state_dir, f"site {name}")
    train, evaluation = (encode(part, policy.labels, tokenizer, settings.data.max_length, f"site {name}",
                                unit_column=unit_column(policy.privacy_unit), task=policy.task) if part else None
                         for part in (training, held_out))
    if train is None:
        raise DataError(f"site {name}: every unit is in the evaluation split; lower --eval-fraction")
    return Site(name=name, state_dir=state_dir, labels=policy.labels, train=train, keys_dir=keys_dir,
                policy=policy, evaluation=evaluation)
