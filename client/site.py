"""Who this site is, what data it holds, and what it accepts: its own policy, never the coordinator's.

Deployment: ``fedtune client start`` gives the SuperNode ``site-name``, ``data-path``,
``state-dir``, ``kit-dir`` and the site's policy flags (``policy.*`` keys) in its node config;
the data file never leaves the site. Simulation: Flower gives ``partition-id`` and
``num-partitions``; the site takes its seeded partition of the shared source, keeps its state
under the run's output directory, and reads its policy from ``policy.json`` there (written by
``fedtune simulate``, which plays every site). Both build the same :class:`SitePolicy`.

Every record a site holds is a training record: there is no hold-out outside the DP guarantee.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError, DataSettings, RunSettings, check_unit, unit_column
from common.data import EncodedData, Record, encode, partition, read_records
from common.files import private_dir, write_json
from common.model import load_tokenizer

log = logging.getLogger("fedtune.client")
POLICY_FILE = "policy.json"
ACCOUNTANTS = ("prv", "rdp")
"""Accountants whose ε is a valid upper bound (PRV and RDP with Poisson subsampling, add/remove-one)."""


class PolicyError(RuntimeError):
    """The run asks for less protection than this site's own policy allows."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts. Set by the site (daemon flags or its policy file), never by the run config.

    A request below it is refused before any privacy budget is spent, with a typed failure.
    """

    labels: tuple[str, ...] = ()
    """The federation's label set, as the site agreed to it (required): a run naming another is refused,
    so the coordinator cannot probe which labels the site's records carry."""
    model_path: str = ""
    """The base model the site trains ("" = the packaged MiniLM): a run naming another is refused."""
    max_epsilon: float = 8.0
    """The most ε (the site's total over the whole federation) the site will ever agree to."""
    max_delta: float | None = None
    """Largest δ accepted; None = min(1e-5, 1/(10·n) rounded down to a power of ten) for n units."""
    accountants: tuple[str, ...] = ACCOUNTANTS
    require_dp: bool = True
    require_secure_aggregation: bool = True
    min_sites: int = 3
    """Fewest sites in a secure round: with two, each site learns the other's update from the sum."""
    all_pairs_up_to: int = 64
    """Secure rounds with at most this many sites must mask every pair (no server-chosen graph)."""
    min_degree: int = 0
    """Fewest mask partners per site in a larger round; 0 = 2·ceil(log2 n) (SecAgg+)."""
    declared_examples: int | None = None
    """The public weight this site declares for averaging; None = equal weights. Never its true count."""
    privacy_unit: str = "record"
    """Whom ε protects at this site: "record", or "column:NAME" (all rows of one patient or customer); the
    run must name the same unit, so the coordinator can never turn a per-patient site into a per-row one."""

    def __post_init__(self) -> None:
        problems = []
        try:
            check_unit(self.privacy_unit, "privacy-unit")
        except ConfigError as exc:
            problems.append(str(exc))
        if not 0 < self.max_epsilon < float("inf"):
            problems.append(f"max-epsilon must be a positive number, got {self.max_epsilon}")
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            problems.append(f"max-delta must be in (0, 1), got {self.max_delta}")
        if not set(self.accountants) <= set(ACCOUNTANTS) or not self.accountants:
            problems.append(f"accountants must be among {ACCOUNTANTS}, got {self.accountants}")
        if self.min_sites < 2:
            problems.append(f"min-sites must be >= 2, got {self.min_sites}")
        if self.all_pairs_up_to < 0 or self.min_degree < 0:
            problems.append("all-pairs-up-to and min-degree must be >= 0")
        if len(set(self.labels)) != len(self.labels):
            problems.append(f"labels must name each label once, got {self.labels}")
        if self.declared_examples is not None and self.declared_examples < 1:
            problems.append(f"declared-examples must be >= 1, got {self.declared_examples}")
        if problems:
            raise ConfigError("site policy: " + "; ".join(problems))

    def check_task(self, settings: RunSettings) -> None:
        """Refuse a run on another label set or model, before the site's data is even read."""
        if not self.labels:
            raise ConfigError("this site's policy names no labels: set them with `fedtune client start --labels` "
                              "(a simulated site's policy.json is written by `fedtune simulate`)")
        if settings.data.labels != self.labels:
            raise PolicyError(f"the run's labels {settings.data.labels} are not the ones this site agreed to "
                              f"{self.labels}")
        if settings.model_path != self.model_path:
            raise PolicyError(f"the run's model {settings.model_path!r} is not the one this site trains "
                              f"{self.model_path!r}")

    def check(self, settings: RunSettings, num_units: int) -> None:
        """Refuse a run that asks for less protection than this policy (before anything is spent)."""
        self.check_task(settings)
        privacy = settings.privacy
        if not privacy.enabled:
            if self.require_dp:
                raise PolicyError("the run turns differential privacy off; this site requires DP")
        else:
            if privacy.unit != self.privacy_unit:
                raise PolicyError(f"the run's privacy unit {privacy.unit!r} is not this site's {self.privacy_unit!r}")
            max_delta = self.max_delta if self.max_delta is not None else default_max_delta(num_units)
            if privacy.epsilon > self.max_epsilon:
                raise PolicyError(f"the run asks for a budget ε={privacy.epsilon:g}; this site allows at most "
                                  f"ε={self.max_epsilon:g}")
            if privacy.delta > max_delta:
                raise PolicyError(f"the run asks for δ={privacy.delta:g}; this site allows at most δ={max_delta:.3g}")
            if privacy.accountant not in self.accountants:
                raise PolicyError(f"the run asks for the {privacy.accountant!r} accountant; this site accepts "
                                  f"{', '.join(self.accountants)}")
        if self.require_secure_aggregation and not settings.federation.secure_aggregation:
            raise PolicyError("the run turns secure aggregation off; this site requires it")

    def weakened(self) -> list[str]:
        """The protections this policy turns off, for a loud warning."""
        return [what for what, off in (("differential privacy", not self.require_dp),
                                       ("secure aggregation", not self.require_secure_aggregation),
                                       (f"secure rounds of {self.min_sites} sites", self.min_sites < 3)) if off]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> SitePolicy:
        """Parse ``{"max-epsilon": 8, ...}`` (node config ``policy.*`` keys or policy.json)."""
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown site policy setting(s) {unknown}; known: {sorted(fields)}")
        kwargs: dict[str, Any] = {}
        try:
            for key, value in values.items():
                name = fields[key].name
                default = getattr(cls, name, None)
                if name in ("accountants", "labels"):
                    parts = str(value).split(",") if isinstance(value, str) else value
                    kwargs[name] = tuple(str(part).strip() for part in parts if str(part).strip())
                elif isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise ValueError(f"{key} must be true or false")
                    kwargs[name] = value
                elif name in ("model_path", "privacy_unit"):
                    kwargs[name] = str(value)
                elif value is None or value == "":
                    kwargs[name] = None
                elif name in ("max_epsilon", "max_delta"):
                    kwargs[name] = float(value)
                else:
                    kwargs[name] = int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): (",".join(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def default_max_delta(num_records: int) -> float:
    """min(1e-5, 1/(10·n) rounded down to a power of ten): never above 1/(10·n), and a refusal it causes
    tells the coordinator at most the order of magnitude of n, and nothing below 10,000 records."""
    return min(1e-5, 10.0 ** math.floor(math.log10(1 / (10 * max(1, num_records)))))


def write_policy(state_dir: Path, policy: SitePolicy) -> Path:
    """A simulated site's own policy file (owner-only), as the person playing the sites set it."""
    path = state_dir / POLICY_FILE
    write_json(path, policy.to_mapping())
    return path


@dataclass(frozen=True)
class Site:
    name: str
    state_dir: Path
    labels: tuple[str, ...]
    train: EncodedData
    keys_dir: Path
    """Where the site's identity key is: its own key directory (deployment) or its state dir (simulation)."""
    policy: SitePolicy
    registry_path: Path | None = None
    """The site's own copy of the registry (deployment); None = the run config's (simulation)."""

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy-ledger.json"


def resolve_site(node_config: Mapping[str, Any], settings: RunSettings) -> Site:
    if not settings.data.labels:
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


def site_paths(node_config: Mapping[str, Any]) -> tuple[Path, Path]:
    """(the site's own key folder, its copy of the registry from the kit) of a deployed site."""
    missing = [k for k in ("site-name", "state-dir", "kit-dir", "keys-dir") if not node_config.get(k)]
    if missing:
        raise ConfigError(f"a deployed site needs {missing} in its node config (fedtune client start sets them)")
    return Path(str(node_config["keys-dir"])), Path(str(node_config["kit-dir"])) / "registry.json"


def _deployed_site(node_config: Mapping[str, Any], settings: RunSettings) -> Site:
    keys_dir, registry = site_paths(node_config)
    policy = SitePolicy.from_mapping({k.removeprefix("policy."): v for k, v in node_config.items()
                                      if k.startswith("policy.")}, "node config")
    site = _encode_site(str(node_config["site-name"]), Path(str(node_config["state-dir"])),
                        read_records(str(node_config["data-path"])), settings, policy=policy, keys_dir=keys_dir)
    return dataclasses.replace(site, registry_path=registry)


def _simulated_site(partition_id: int, num_partitions: int, settings: RunSettings) -> Site:
    records, parts = simulation_partitions(settings.data, num_partitions)
    mine = [records[i] for i in parts[partition_id]]
    name = f"site-{partition_id}"
    state_dir = settings.out_dir.resolve() / "sites" / name
    policy_path = state_dir / POLICY_FILE
    try:
        policy = (SitePolicy.from_mapping(json.loads(policy_path.read_text()), str(policy_path))
                  if policy_path.exists() else SitePolicy())
    except ValueError as exc:
        raise ConfigError(f"site policy {policy_path} is unreadable ({exc}); fix or delete it") from exc
    return _encode_site(name, state_dir, mine, settings, policy=policy, keys_dir=state_dir)


@functools.lru_cache(maxsize=2)
def simulation_partitions(data: DataSettings, sites: int) -> tuple[list[Record], list[list[int]]]:
    records = read_records(data.source)
    return records, partition(records, sites, data.partition, alpha=data.dirichlet_alpha, seed=data.seed)


def _encode_site(name: str, state_dir: Path, records: list[Record], settings: RunSettings,
                 *, policy: SitePolicy, keys_dir: Path) -> Site:
    policy.check_task(settings)  # the coordinator's labels and model never decide how the records are read
    tokenizer = load_tokenizer(policy.model_path)
    train = encode(records, policy.labels, tokenizer, settings.data.max_length, f"site {name}",
                   unit_column=unit_column(policy.privacy_unit))
    return Site(name=name, state_dir=state_dir, labels=policy.labels, train=train, keys_dir=keys_dir,
                policy=policy)
