"""A site's privacy: the ε ledger on its own disk (Opacus' accountants), and its sources of randomness.

The ledger is the accountant's history (one (σ, q, steps) entry per distinct setting), kept
across rounds and process restarts. σ is planned ONCE from the site's total budget over all
planned rounds × epochs. A round is charged BEFORE it trains (write-ahead), under an exclusive
lock, and a round that would take the site past its budget is refused.

The ledger is bound to the site's hash-chained audit log (``audit.jsonl`` next to it): every
charge logs the ledger file's new sha256, so a deleted, edited or swapped ledger is refused,
never restarted at zero. Noise and Poisson sampling draw from fresh OS entropy every round, so
the coordinator, who knows the whole run config, cannot replay a site's update.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.audit import AuditLog, verified_entries
from common.config import PrivacySettings
from common.files import exclusive_lock, file_sha256, private_dir, replace_durably, write_json

LEDGER_VERSION = 2
AUDIT_FILE = "audit.jsonl"
CHARGE_EVENT = "privacy-charged"
EPSILON_SLACK = 1e-6
"""Numerical slack when comparing ε with the budget (accountants differ in the last digits)."""

History = list[tuple[float, float, int]]


@functools.lru_cache(maxsize=1024)
def epsilon_of(accountant: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """ε of a (σ, q, steps) history. A pure function, memoised: a PRV evaluation takes about a second."""
    if not history:
        return 0.0
    counter = create_accountant(accountant)
    counter.history = list(history)
    return float(counter.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def noise_multiplier_for(accountant: str, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest σ that keeps ``steps`` steps at ``sample_rate`` within (ε, δ); memoised (a search of PRV
    evaluations takes several seconds)."""
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from OS entropy: nothing the coordinator knows (config, site, round) seeds it."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class BudgetExhausted(RuntimeError):
    """Training this round would take the site past its ε budget."""

    def __init__(self, *, budget: float, spent: float, would_be: float) -> None:
        self.budget, self.spent, self.would_be = budget, spent, would_be
        super().__init__(
            f"privacy budget exhausted: this round would raise ε from {spent:.3f} to {would_be:.3f}, "
            f"over the site's budget ε={budget:g}; the site will not train again"
        )


class LedgerError(RuntimeError):
    """The ledger is unreadable, deleted, edited, unbound from the audit log, or contradicts the budget."""


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
    """The site's ε account: JSON at ``path`` (0600, in a 0700 directory), bound to ``path.parent/audit.jsonl``.

    Opening it verifies the binding (LedgerError if the ledger was deleted, edited or its audit log lost);
    :meth:`charge_round` is the only way to spend.
    """

    def __init__(self, path: Path, settings: PrivacySettings) -> None:
        self.path = path
        self.settings = settings
        self.audit_path = path.parent / AUDIT_FILE
        self._lock = path.with_name(f"{path.name}.lock")
        self._pending = path.with_name(f"{path.name}.pending")
        self.plan: NoisePlan | None = None
        self.history: History = []
        self.rounds: list[RoundEntry] = []
        private_dir(path.parent)
        with exclusive_lock(self._lock):
            self._load()

    def _charges(self) -> list[dict]:
        """This ledger's charges in the site's audit log (verified chain); [] without a log."""
        if not self.audit_path.exists():
            return []
        try:
            entries = verified_entries(self.audit_path)
        except (OSError, ValueError) as exc:
            raise LedgerError(f"the site's audit log fails verification ({exc}); the ε this site spent cannot "
                              "be trusted: restore the log and ledger from backup") from exc
        return [e for e in entries if e.get("event") == CHARGE_EVENT and e.get("ledger") == self.path.name]

    def _load(self) -> None:
        charges = self._charges()
        last_sha = charges[-1].get("ledger_sha256") if charges else None
        if self._pending.exists():  # a charge interrupted by a crash
            if last_sha is not None and file_sha256(self._pending) == last_sha:
                replace_durably(self._pending, self.path)  # it was logged: complete it
            else:
                self._pending.unlink()  # never logged, so never charged (and nothing trained)
        if not self.path.exists():
            if charges:
                raise LedgerError(
                    f"privacy ledger {self.path} was deleted, but the site's audit log {self.audit_path} records "
                    f"{len(charges)} charge(s); restore the ledger from "
                    "backup. The site will not start again at zero"
                )
            self.plan, self.history, self.rounds = None, [], []
            return
        if last_sha is None:
            raise LedgerError(
                f"privacy ledger {self.path} has no charge in the site's audit log {self.audit_path} "
                f"({'the log is missing' if not self.audit_path.exists() else 'not bound to this log'}); "
                "restore both from backup"
            )
        if file_sha256(self.path) != last_sha:
            raise LedgerError(
                f"privacy ledger {self.path} was edited: its sha256 differs from the one the audit log recorded "
                "at the last charge; restore it from backup"
            )
        try:
            saved = json.loads(self.path.read_text())
            budget = saved["budget"]
            if saved.get("version") != LEDGER_VERSION:
                raise LedgerError(f"ledger {self.path} has version {saved.get('version')}, expected {LEDGER_VERSION}")
            plan = NoisePlan(**saved["plan"]) if saved.get("plan") else None
            history = [(float(s), float(q), int(n)) for s, q, n in saved["history"]]
            rounds = [RoundEntry(**entry) for entry in saved["rounds"]]
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
        self.plan, self.history, self.rounds = plan, history, rounds

    def _epsilon(self, history: History) -> float:
        return epsilon_of(self.settings.accountant, tuple(tuple(entry) for entry in history), self.settings.delta)

    def spent(self) -> float:
        return self._epsilon(self.history)

    def plan_noise(self, *, sample_rate: float, steps_per_round: int, rounds: int) -> NoisePlan:
        """σ for the whole budget over ``rounds`` rounds; computed once (it persists with the first charge)."""
        if self.plan is None:
            sigma = noise_multiplier_for(self.settings.accountant, self.settings.epsilon, self.settings.delta,
                                         sample_rate, steps_per_round * rounds)
            self.plan = NoisePlan(sigma, sample_rate, steps_per_round, rounds, self.settings.max_grad_norm)
        return self.plan

    def charge_round(self, *, run_id: int, server_round: int, sample_rate: float, steps: int,
                     planned_rounds: int) -> RoundEntry:
        """Charge a round of ``steps`` steps at ``sample_rate`` BEFORE it trains, durably.

        Under the lock: reload (another process may have charged), plan σ if this is the first round,
        raise BudgetExhausted (nothing charged) if over budget, else persist and log the charge.
        """
        with exclusive_lock(self._lock):
            self._load()
            plan = self.plan_noise(sample_rate=sample_rate, steps_per_round=steps, rounds=planned_rounds)
            sigma = plan.noise_multiplier
            if self.history and self.history[-1][:2] == (sigma, sample_rate):  # merged, as Opacus does
                history = [*self.history[:-1], (sigma, sample_rate, self.history[-1][2] + steps)]
            else:
                history = [*self.history, (sigma, sample_rate, steps)]
            would_be = self._epsilon(history)
            if would_be > self.settings.epsilon + EPSILON_SLACK:
                raise BudgetExhausted(budget=self.settings.epsilon, spent=self.spent(), would_be=would_be)
            entry = RoundEntry(server_round, run_id, steps, sample_rate, would_be)
            self._commit(plan, history, [*self.rounds, entry])
        return entry

    def _commit(self, plan: NoisePlan, history: History, rounds: list[RoundEntry]) -> None:
        """Write-ahead: the new ledger beside the old, its sha256 in the audit log, then the rename.
        A crash at any point leaves either the old ledger (charge not logged) or one :meth:`_load` completes."""
        write_json(self._pending, {
            "version": LEDGER_VERSION,
            "budget": {"epsilon": self.settings.epsilon, "delta": self.settings.delta},
            "accountant": self.settings.accountant,
            "plan": asdict(plan),
            "history": [list(entry) for entry in history],
            "rounds": [asdict(entry) for entry in rounds],
            "epsilon_spent": rounds[-1].epsilon,
        })
        AuditLog(self.audit_path).record(CHARGE_EVENT, ledger=self.path.name, ledger_sha256=file_sha256(self._pending),
                                         epsilon=rounds[-1].epsilon, run_id=rounds[-1].run_id,
                                         round=rounds[-1].round)
        replace_durably(self._pending, self.path)
        self.plan, self.history, self.rounds = plan, history, rounds

    def report(self) -> dict:
        """What the site tells the coordinator, in the clear: ε (rounded UP to 4 decimals), δ, budget, accountant.
        Never σ, q, steps or rounds: together they pin the site's number of records."""
        return {
            "epsilon": math.ceil(self.spent() * 1e4) / 1e4,
            "delta": self.settings.delta,
            "budget": self.settings.epsilon,
            "accountant": self.settings.accountant,
        }
