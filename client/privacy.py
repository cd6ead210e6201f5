"""A site's privacy: the ε ledger on its own disk, and the one Opacus PrivacyEngine factory.

The ledger is the accountant's history (one (σ, q, steps) entry per distinct setting), kept
across rounds and process restarts. σ is planned ONCE from the site's total budget over all
planned rounds × epochs, and every round is checked BEFORE it trains: a round that would take
the site past its budget is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader

from common.config import PrivacySettings
from common.files import write_json

LEDGER_VERSION = 1
EPSILON_SLACK = 1e-6
"""Numerical slack when comparing ε with the budget (accountants differ in the last digits)."""


class BudgetExhausted(RuntimeError):
    """Training this round would take the site past its ε budget."""

    def __init__(self, *, budget: float, spent: float, would_be: float) -> None:
        self.budget, self.spent, self.would_be = budget, spent, would_be
        super().__init__(
            f"privacy budget exhausted: this round would raise ε from {spent:.3f} to {would_be:.3f}, "
            f"over the site's budget ε={budget:g}; the site will not train again"
        )


class LedgerError(RuntimeError):
    """The ledger file is unreadable or contradicts the site's configured budget."""


@dataclass(frozen=True)
class NoisePlan:
    """σ fixed at the site's first round, from the budget spread over the planned steps."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    max_grad_norm: float


@dataclass(frozen=True)
class RoundEntry:
    round: int
    run_id: int
    steps: int
    sample_rate: float
    epsilon: float


class PrivacyLedger:
    """The site's ε account, persisted as JSON (atomic writes)."""

    def __init__(self, path: Path, settings: PrivacySettings) -> None:
        self.path = path
        self.settings = settings
        self.plan: NoisePlan | None = None
        self.history: list[tuple[float, float, int]] = []
        self.rounds: list[RoundEntry] = []
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            saved = json.loads(self.path.read_text())
            budget = saved["budget"]
            if saved.get("version") != LEDGER_VERSION:
                raise LedgerError(f"ledger {self.path} has version {saved.get('version')}, expected {LEDGER_VERSION}")
            self.plan = NoisePlan(**saved["plan"]) if saved.get("plan") else None
            self.history = [(float(s), float(q), int(n)) for s, q, n in saved["history"]]
            self.rounds = [RoundEntry(**entry) for entry in saved["rounds"]]
            accountant = saved["accountant"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({exc}); restore it from backup. "
                "Deleting it would forget the ε this site already spent"
            ) from exc
        if (budget["epsilon"], budget["delta"], accountant) != (
            self.settings.epsilon, self.settings.delta, self.settings.accountant
        ):
            raise LedgerError(
                f"ledger {self.path} was opened with budget ε={budget['epsilon']}, δ={budget['delta']} "
                f"({accountant}); the site is now configured with ε={self.settings.epsilon}, "
                f"δ={self.settings.delta} ({self.settings.accountant}). A budget cannot change silently: "
                "restore the original settings, or start a new ledger (state dir) under a new data-use approval"
            )

    def save(self) -> None:
        payload = {
            "version": LEDGER_VERSION,
            "budget": {"epsilon": self.settings.epsilon, "delta": self.settings.delta},
            "accountant": self.settings.accountant,
            "plan": asdict(self.plan) if self.plan else None,
            "history": [list(entry) for entry in self.history],
            "rounds": [asdict(entry) for entry in self.rounds],
            "epsilon_spent": self.spent(),
        }
        write_json(self.path, payload)

    def _epsilon(self, history: list[tuple[float, float, int]]) -> float:
        if not history:
            return 0.0
        accountant = create_accountant(self.settings.accountant)
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta=self.settings.delta))

    def spent(self) -> float:
        return self._epsilon(self.history)

    def plan_noise(self, *, sample_rate: float, steps_per_round: int, rounds: int) -> NoisePlan:
        """σ for the whole budget over ``rounds`` rounds; computed once, then reused."""
        if self.plan is None:
            sigma = get_noise_multiplier(
                target_epsilon=self.settings.epsilon,
                target_delta=self.settings.delta,
                sample_rate=sample_rate,
                steps=steps_per_round * rounds,
                accountant=self.settings.accountant,
            )
            self.plan = NoisePlan(sigma, sample_rate, steps_per_round, rounds, self.settings.max_grad_norm)
        return self.plan

    def check_round(self, *, sample_rate: float, steps: int) -> float:
        """ε after a round of ``steps`` steps at ``sample_rate``; raises BudgetExhausted if over budget."""
        assert self.plan is not None, "plan_noise() first"
        would_be = self._epsilon(self.history + [(self.plan.noise_multiplier, sample_rate, steps)])
        if would_be > self.settings.epsilon + EPSILON_SLACK:
            raise BudgetExhausted(budget=self.settings.epsilon, spent=self.spent(), would_be=would_be)
        return would_be

    def record_round(self, *, server_round: int, run_id: int, history: list[tuple[float, float, int]],
                     steps: int, sample_rate: float) -> RoundEntry:
        """Adopt the accountant's history after a round and persist it."""
        self.history = [(float(s), float(q), int(n)) for s, q, n in history]
        entry = RoundEntry(server_round, run_id, steps, sample_rate, self.spent())
        self.rounds.append(entry)
        self.save()
        return entry

    def report(self) -> dict:
        """What the site reports about its privacy (no data, only accounting)."""
        return {
            "epsilon": self.spent(),
            "delta": self.settings.delta,
            "budget": self.settings.epsilon,
            "accountant": self.settings.accountant,
            "noise_multiplier": self.plan.noise_multiplier if self.plan else None,
            "max_grad_norm": self.settings.max_grad_norm,
            "history": [list(entry) for entry in self.history],
            "rounds_trained": len(self.rounds),
        }


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Opacus' Poisson loader runs len(loader) = ceil(N/B) steps per epoch at q = 1/len(loader)."""
    return math.ceil(num_examples / batch_size)


def make_private(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    ledger: PrivacyLedger,
) -> tuple[PrivacyEngine, torch.nn.Module, torch.optim.Optimizer, DataLoader]:
    """The one way a site turns on DP-SGD: Poisson sampling, per-sample clipping, planned σ,
    and the accountant resumed from the ledger's history."""
    assert ledger.plan is not None, "plan_noise() first"
    engine = PrivacyEngine(accountant=ledger.settings.accountant)
    engine.accountant.load_state_dict({"history": list(ledger.history), "mechanism": ledger.settings.accountant})
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=ledger.plan.noise_multiplier,
        max_grad_norm=ledger.settings.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode="hooks",
    )
    return engine, private_model, private_optimizer, private_loader
