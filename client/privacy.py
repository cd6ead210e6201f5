"""A site's privacy: the ε ledger on its own disk (Opacus' accountants), and its sources of randomness.

The ledger is the accountant's history (one (σ, q, steps) entry per distinct setting), kept
across rounds and process restarts. σ is planned ONCE from the site's total budget over all
planned rounds × epochs. A round is charged BEFORE it trains (write-ahead), under an exclusive
lock, and a round that would take the site past its budget is refused.

A site that declares no size plans from ñ, a DP estimate of its number of units drawn once and kept
here (:meth:`PrivacyLedger.estimated_units`): pure ε_n-DP with ε_n = ε/50, composed with DP-SGD's ε
by basic composition, so the ε the site reports is ε_n + ε_DP-SGD(σ, q, steps, δ), a function of
public values only.

Distributed DP (privacy.dp-mode = distributed, common/distributed_dp.py): each round is one Poisson-subsampled
Skellam step, charged write-ahead (:meth:`PrivacyLedger.charge_distributed`) with the exact Skellam RDP accountant
twice: ε against the coordinator (the honest sites' noise, variance μ: the budget binds it) and ε of the site's own
share alone (μ/h: reported beside it, what is left if secure aggregation or the site's honesty assumption fails).
A site with both local and distributed steps composes them by basic composition, each at δ/2.

The ledger is bound to the site's hash-chained audit log (``audit.jsonl`` next to it): every
charge logs the ledger file's new sha256, so a deleted, edited or swapped ledger is refused,
never restarted at zero. Noise and Poisson sampling draw from fresh OS entropy every round, so
the coordinator, who knows the whole run config, cannot replay a site's update.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import secrets
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.audit import AuditLog, verified_entries
from common.config import PrivacySettings
from common.discrete_noise import discrete_laplace
from common.distributed_dp import DistributedDpPlan, SkellamCharge, skellam_charges_epsilon
from common.federated_eval import zcdp_epsilon
from common.files import exclusive_lock, file_sha256, private_dir, replace_durably, write_json

LEDGER_VERSION = 2
AUDIT_FILE = "audit.jsonl"
LEDGER_FILE = "privacy-ledger.json"
"""The ledger's name in the site's state dir (its exporter reads it there too: fedtune.runtime.monitoring)."""
CHARGE_EVENT = "privacy-charged"
EPSILON_SLACK = 1e-6
"""Numerical slack when comparing ε with the budget (accountants differ in the last digits)."""
SKELLAM_ACCOUNTANT = "skellam-rdp"
"""The accountant of distributed steps, named in the report (common.distributed_dp's Skellam RDP)."""
ESTIMATE_SHARE = Fraction(1, 50)
"""The share of the budget ε a site spends, once, on its DP estimate ñ of its number of units (when it declares
no size). 2 % raises σ by about 2 %; ñ is off by 1/ε_n = 50/ε units on average (the plan's q and steps hardly
move with n: only the update's scale, n/ñ, does). A site whose size is public declares it and spends nothing."""

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
class SizeEstimate:
    """ñ = max(1, n + discrete Laplace of scale 1/ε): the site's public size when it declares none."""

    units: int
    epsilon: float


@dataclass(frozen=True)
class RoundEntry:
    round: int
    run_id: int
    steps: int
    sample_rate: float
    epsilon: float


@dataclass(frozen=True)
class DistributedEntry:
    """``steps`` distributed-DP steps of one setting (consecutive equal settings are merged, as Opacus merges)."""

    variance: float
    """μ: the noise the honest sites' shares reach together (ε against the coordinator)."""
    site_variance: float
    """μ/h: this site's own share (ε of its own noise alone)."""
    l2_bound: float
    l1_bound: float
    sample_rate: float
    steps: int

    def charges(self) -> tuple[SkellamCharge, SkellamCharge]:
        """(against the coordinator, the site's own noise alone)."""
        return (SkellamCharge(self.variance, self.l2_bound, self.l1_bound, self.sample_rate, self.steps),
                SkellamCharge(self.site_variance, self.l2_bound, self.l1_bound, self.sample_rate, self.steps))


@dataclass(frozen=True)
class EvaluationAccount:
    """The ε of the site's federated evaluations (zCDP: ρ adds up), apart from training's: evaluation units never
    train (client.site_eval), so a unit is in one account or the other (parallel composition)."""

    epsilon: float
    """The budget: federation.eval-epsilon of the run that first evaluated here (it cannot change silently)."""
    delta: float
    rho: float = 0.0
    rounds: tuple[tuple[int, int], ...] = ()
    """(run id, round) of each evaluation charged."""

    def spent(self) -> float:
        return zcdp_epsilon(self.rho, self.delta) if self.rho else 0.0


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
        self.estimate: SizeEstimate | None = None
        self.evaluation: EvaluationAccount | None = None
        self.distributed: list[DistributedEntry] = []
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
            self.plan, self.history, self.rounds, self.estimate, self.evaluation = None, [], [], None, None
            self.distributed = []
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
            estimate = SizeEstimate(**saved["estimate"]) if saved.get("estimate") else None
            evaluation = saved.get("evaluation")
            evaluation = (EvaluationAccount(evaluation["epsilon"], evaluation["delta"], float(evaluation["rho"]),
                                            tuple((int(r), int(n)) for r, n in evaluation["rounds"]))
                          if evaluation else None)
            accountant = saved["accountant"]
            distributed = [DistributedEntry(**entry) for entry in saved.get("distributed", [])]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({exc}); restore it from backup. "
                "Deleting it would forget the ε this site already spent"
            ) from exc
        if budget is not None and (budget["epsilon"], budget["delta"], accountant) != (
            self.settings.epsilon, self.settings.delta, self.settings.accountant
        ):
            raise LedgerError(
                f"ledger {self.path} was opened with budget ε={budget['epsilon']}, δ={budget['delta']} "
                f"({accountant}); the site is now configured with ε={self.settings.epsilon}, "
                f"δ={self.settings.delta} ({self.settings.accountant}). A budget cannot change silently: "
                "restore the original settings, or start a new ledger (state dir) under a new data-use approval"
            )
        self.plan, self.history, self.rounds, self.estimate = plan, history, rounds, estimate
        self.evaluation, self.distributed = evaluation, distributed

    def _epsilon(self, history: History, distributed: list[DistributedEntry] | None = None, *,
                 own_noise: bool = False) -> float:
        """ε_n of the size estimate (pure DP) + DP-SGD's ε of ``history`` + the Skellam steps' ε of ``distributed``
        (default: the ledger's; against the coordinator, or ``own_noise``: of the site's shares alone): basic
        composition, δ split in two when both kinds of steps were taken."""
        distributed = self.distributed if distributed is None else distributed
        delta = self.settings.delta / 2 if history and distributed else self.settings.delta
        dp_sgd = epsilon_of(self.settings.accountant, tuple(tuple(entry) for entry in history), delta)
        skellam = skellam_charges_epsilon(tuple(entry.charges()[own_noise] for entry in distributed), delta)
        return (self.estimate.epsilon if self.estimate else 0.0) + dp_sgd + skellam

    def spent(self) -> float:
        return self._epsilon(self.history)

    def spent_own_noise(self) -> float:
        """ε of the site's own noise alone: what is left of its protection if secure aggregation or its assumption of
        honest sites fails (equal to :meth:`spent` without distributed steps)."""
        return self._epsilon(self.history, own_noise=True)

    def estimated_units(self, units: int, *, run_id: int, server_round: int) -> int:
        """ñ = max(1, n + discrete Laplace of scale 1/ε_n), ε_n = ε/50: the site's DP estimate of its ``units``,
        drawn ONCE from OS entropy and charged before anyone uses it. Every later call (another round, process
        or run) returns the same ñ whatever n is by then: a redraw would release a fresh estimate, and the mean
        of many pins n."""
        with exclusive_lock(self._lock):
            self._load()
            if self.estimate is None:
                epsilon = ESTIMATE_SHARE * Fraction(self.settings.epsilon)
                would_be = self.spent() + float(epsilon)
                if would_be > self.settings.epsilon + EPSILON_SLACK:
                    raise BudgetExhausted(budget=self.settings.epsilon, spent=self.spent(), would_be=would_be)
                estimate = SizeEstimate(max(1, units + discrete_laplace(epsilon)), float(epsilon))
                self._commit(self.plan, self.history, self.rounds, estimate, epsilon=would_be, run_id=run_id,
                             server_round=server_round)
            assert self.estimate is not None
            return self.estimate.units

    def plan_noise(self, *, sample_rate: float, steps_per_round: int, rounds: int) -> NoisePlan:
        """σ for the budget left after the size estimate, over ``rounds`` rounds; computed once (it persists with
        the first charge)."""
        if self.plan is None:
            epsilon = self.settings.epsilon - (self.estimate.epsilon if self.estimate else 0.0)
            sigma = noise_multiplier_for(self.settings.accountant, epsilon, self.settings.delta,
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
            self._commit(plan, history, [*self.rounds, entry], self.estimate, epsilon=would_be, run_id=run_id,
                         server_round=server_round)
        return entry

    def charge_distributed(self, *, run_id: int, server_round: int, plan: DistributedDpPlan) -> RoundEntry:
        """Charge one distributed-DP step of ``plan`` (the public plan with this site's share,
        common.distributed_dp.site_share) BEFORE it is computed, durably; BudgetExhausted (nothing charged) when ε
        against the coordinator would pass the budget."""
        s = plan.settings
        step = DistributedEntry(plan.total_variance, plan.site_variance, plan.unit_l2_bound, plan.unit_l1_bound,
                                s.sample_rate, 1)
        with exclusive_lock(self._lock):
            self._load()
            last = self.distributed[-1] if self.distributed else None
            if last is not None and dataclasses.replace(last, steps=1) == step:
                distributed = [*self.distributed[:-1], dataclasses.replace(last, steps=last.steps + 1)]
            else:
                distributed = [*self.distributed, step]
            would_be = self._epsilon(self.history, distributed)
            if would_be > self.settings.epsilon + EPSILON_SLACK:
                raise BudgetExhausted(budget=self.settings.epsilon, spent=self.spent(), would_be=would_be)
            entry = RoundEntry(server_round, run_id, 1, s.sample_rate, would_be)
            self._commit(self.plan, self.history, [*self.rounds, entry], self.estimate, epsilon=would_be,
                         run_id=run_id, server_round=server_round, distributed=distributed)
        return entry

    def charge_evaluation(self, *, run_id: int, server_round: int, rho: float, budget: float, delta: float) -> float:
        """Charge one federated evaluation of ρ (zCDP) BEFORE it is scored, durably; the evaluation account's ε.
        Raises BudgetExhausted (nothing charged) past ``budget`` (the run's federation.eval-epsilon at ``delta``),
        and LedgerError if the account was opened with another budget."""
        with exclusive_lock(self._lock):
            self._load()
            account = self.evaluation or EvaluationAccount(budget, delta)
            if (account.epsilon, account.delta) != (budget, delta):
                raise LedgerError(
                    f"the evaluation account of {self.path} was opened with ε={account.epsilon:g}, "
                    f"δ={account.delta:g}; "
                    f"this run asks for ε={budget:g}, δ={delta:g}. A budget cannot change silently: restore the "
                    "run's federation.eval-epsilon, or start a new ledger (state dir) under a new data-use approval")
            charged = dataclasses.replace(account, rho=account.rho + rho,
                                          rounds=(*account.rounds, (run_id, server_round)))
            if charged.spent() > budget + EPSILON_SLACK:
                raise BudgetExhausted(budget=budget, spent=account.spent(), would_be=charged.spent())
            self._commit(self.plan, self.history, self.rounds, self.estimate, epsilon=self.spent(), run_id=run_id,
                         server_round=server_round, evaluation=charged)
        return charged.spent()

    def _commit(self, plan: NoisePlan | None, history: History, rounds: list[RoundEntry],
                estimate: SizeEstimate | None, *, epsilon: float, run_id: int, server_round: int,
                evaluation: EvaluationAccount | None = None,
                distributed: list[DistributedEntry] | None = None) -> None:
        """Write-ahead: the new ledger beside the old, its sha256 in the audit log, then the rename.
        A crash at any point leaves either the old ledger (charge not logged) or one :meth:`_load` completes.
        The budget binds at the first round (a size estimate alone binds nothing: the run that drew it may still
        be refused on its δ or steps). ``evaluation``: the evaluation account after this charge (default: as is)."""
        evaluation = evaluation or self.evaluation
        distributed = self.distributed if distributed is None else distributed
        write_json(self._pending, {
            "version": LEDGER_VERSION,
            "budget": {"epsilon": self.settings.epsilon, "delta": self.settings.delta} if rounds else None,
            "accountant": self.settings.accountant,
            "plan": asdict(plan) if plan else None,
            "history": [list(entry) for entry in history],
            "rounds": [asdict(entry) for entry in rounds],
            "estimate": asdict(estimate) if estimate else None,
            "evaluation": asdict(evaluation) if evaluation else None,
            "distributed": [asdict(entry) for entry in distributed],
            "epsilon_spent": epsilon,
        })
        AuditLog(self.audit_path).record(CHARGE_EVENT, ledger=self.path.name, ledger_sha256=file_sha256(self._pending),
                                         epsilon=epsilon, run_id=run_id, round=server_round)
        replace_durably(self._pending, self.path)
        self.plan, self.history, self.rounds, self.estimate = plan, history, rounds, estimate
        self.evaluation, self.distributed = evaluation, distributed

    def report(self) -> dict:
        """What the site tells the coordinator, in the clear: ε (rounded UP to 4 decimals; ε_n of the size estimate
        included), with distributed steps also ε of its own noise alone (likewise), δ, budget, accountant. Both are
        functions of public values only (the public size, the run's settings): sites of n and n + 1 units with the
        same public size report the same bits."""
        own_noise = {"own_noise_epsilon": math.ceil(self.spent_own_noise() * 1e4) / 1e4} if self.distributed else {}
        composed = ([self.settings.accountant] if self.history or not self.distributed else []) + (
            [SKELLAM_ACCOUNTANT] if self.distributed else [])
        return {
            "epsilon": math.ceil(self.spent() * 1e4) / 1e4,
            "delta": self.settings.delta,
            "budget": self.settings.epsilon,
            "accountant": "+".join(composed),
        } | own_noise
