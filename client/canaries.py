"""A site's privacy-audit canaries: white-box gradient canaries in its own DP-SGD step ("Dirac" canaries, Nasr
et al. 2023), audited in one run (common/privacy_audit.py).

Canary j is a coordinate of the trainable adapter (LoRA's B, a head), chosen with OS randomness, and is included
in the run with probability 1/2, also from OS entropy. An included canary is one more privacy unit: at each
DP-SGD step it joins the batch with the plan's Poisson rate q, as every unit does, with the clipped gradient
C·e_j, before the noise (client/per_unit_grads.py). Joining every step instead would make it a unit sampled at
rate 1, which the accountant's ε does not cover. Canaries are synthetic: they depend on no record, and adding
them changes nothing of the guarantee for records (the noise and each record's sensitivity are unchanged).

The score of canary j is how far coordinate j of the GLOBAL adapter moved down (the descent direction of
+C·e_j) between the first adapter the site received in the run and the latest: a function of DP releases only,
so the audit's result (bound, m, r, v) releases nothing more about records. The canaries (coordinates,
inclusion bits) and the coordinates observed each round stay in the site's state dir, owner-only.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from common.files import private_dir, write_json
from common.privacy_audit import AuditError, AuditResult, audit, write_audit_result

CANARY_DIR = "privacy-audit"


@dataclass(frozen=True)
class Canary:
    parameter: str
    """Its parameter's name in ``model.named_parameters()``."""
    index: int
    """Its coordinate in the flattened parameter."""
    included: bool


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def draw_canaries(model: torch.nn.Module, count: int) -> tuple[Canary, ...]:
    """``count`` distinct coordinates of the model's trainable parameters, each included with probability 1/2,
    all from OS entropy."""
    sizes = {name: param.numel() for name, param in trainable_parameters(model).items()}
    total = sum(sizes.values())
    if not 2 <= count <= total:
        raise AuditError(f"an audit needs between 2 and {total} canaries (the adapter's trainable coordinates), "
                         f"got {count}; set the site's --audit-canaries within that range")
    chosen = np.random.default_rng(secrets.randbits(128)).choice(total, size=count, replace=False)
    names, ends = list(sizes), np.cumsum(list(sizes.values()))
    canaries = []
    for flat in chosen.tolist():
        which = int(np.searchsorted(ends, flat, side="right"))
        start = int(ends[which - 1]) if which else 0
        canaries.append(Canary(names[which], flat - start, secrets.randbits(1) == 1))
    return tuple(canaries)


def coordinates(model: torch.nn.Module, canaries: Sequence[Canary]) -> list[float]:
    """The model's value at each canary's coordinate."""
    params = trainable_parameters(model)
    return [float(params[c.parameter].detach().reshape(-1)[c.index]) for c in canaries]


def included_coordinates(model: torch.nn.Module, canaries: Sequence[Canary]
                         ) -> list[tuple[torch.nn.Parameter, int]]:
    """The included canaries as (parameter, flat index) of ``model``: what PerUnitDPSGD.step adds."""
    params = trainable_parameters(model)
    return [(params[c.parameter], c.index) for c in canaries if c.included]


def joining(included: Sequence[tuple[torch.nn.Parameter, int]], sample_rate: float, generator: torch.Generator
            ) -> list[tuple[torch.nn.Parameter, int]]:
    """The included canaries that join one step's batch: each independently with the plan's Poisson rate."""
    drawn = torch.rand(len(included), generator=generator) < sample_rate
    return [canary for canary, joins in zip(included, drawn.tolist(), strict=True) if joins]


def scores(first: Sequence[float], latest: Sequence[float]) -> list[float]:
    """How far each canary's coordinate moved down (its gradient +C·e_j pushes it down)."""
    return [before - after for before, after in zip(first, latest, strict=True)]


class RunCanaries:
    """The site's canaries for one run and the canary coordinates of each global adapter it received:
    ``STATE/privacy-audit/run-<id>.json`` (0600, in a 0700 directory). The secrets the audit needs."""

    def __init__(self, path: Path, run_id: int, canaries: tuple[Canary, ...], observed: dict[int, list[float]]
                 ) -> None:
        self.path, self.run_id, self.canaries, self.observed = path, run_id, canaries, observed

    @classmethod
    def open(cls, state_dir: Path, run_id: int, model: torch.nn.Module, count: int) -> RunCanaries:
        """The run's canaries, drawn at its first round and kept for all its rounds (a different ``count`` later
        in the run keeps the drawn ones: changing them mid-run would void the audit)."""
        path = private_dir(state_dir / CANARY_DIR) / f"run-{run_id}.json"
        if not path.exists():
            found = cls(path, run_id, draw_canaries(model, count), {})
            found._save()
            return found
        try:
            saved = json.loads(path.read_text())
            found = cls(path, run_id, tuple(Canary(**c) for c in saved["canaries"]),
                        {int(r): [float(x) for x in values] for r, values in saved["observed"].items()})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AuditError(f"the audit's canaries {path} are unreadable ({exc}); delete the file to audit this "
                             "run's remaining rounds with new canaries") from exc
        params = trainable_parameters(model)
        if any(c.parameter not in params or c.index >= params[c.parameter].numel() for c in found.canaries):
            raise AuditError(f"the audit's canaries {path} name coordinates this model does not train; delete "
                             "the file to audit this run's remaining rounds with new canaries")
        return found

    def observe(self, server_round: int, model: torch.nn.Module) -> None:
        """Keep the canaries' coordinates of the global adapter received for ``server_round`` (loaded in
        ``model``), before the site trains on it."""
        self.observed[server_round] = coordinates(model, self.canaries)
        self._save()

    def audit(self, delta: float, epsilon_accounted: float | None) -> AuditResult | None:
        """The audit of the global adapters received so far: the latest against the first (None before a
        second one arrives)."""
        if len(self.observed) < 2:
            return None
        rounds = sorted(self.observed)
        return audit(scores(self.observed[rounds[0]], self.observed[rounds[-1]]),
                     [c.included for c in self.canaries], delta, epsilon_accounted=epsilon_accounted,
                     rounds=rounds[-1] - rounds[0], run_id=self.run_id)

    def _save(self) -> None:
        write_json(self.path, {"canaries": [asdict(c) for c in self.canaries],
                               "observed": {str(r): values for r, values in self.observed.items()}})


def audit_round(state_dir: Path, *, run_id: int, server_round: int, model: torch.nn.Module, count: int,
                delta: float, epsilon_accounted: float) -> tuple[Canary, ...]:
    """A site's audit at one round, before it trains on the global adapter loaded in ``model``: keep that adapter's
    canary coordinates, write the audit of the run so far (``audit-result.json``, from the second round on: the
    latest adapter against the first), and return the run's canaries to train with. ``epsilon_accounted``: what the
    site's ledger says it spent before this round (what the adapters audited can have cost)."""
    canaries = RunCanaries.open(state_dir, run_id, model, count)
    canaries.observe(server_round, model)
    result = canaries.audit(delta, epsilon_accounted)
    if result is not None:
        write_audit_result(state_dir, result)
    return canaries.canaries
