"""A site's side of federated evaluation: its evaluation split, and what it releases about each round's model.

The split. The site holds out whole privacy units (records, or persons: every row of one) with OS randomness, each
unit in the evaluation split with probability ``policy.eval_fraction`` independently of the others, drawn ONCE and
kept in ``eval-split.json`` in its state dir (0600: sha256 digests of the units, never sent); a unit that appears
later gets its own draw, and a changed fraction is refused (a unit that was evaluated must never train). A site
whose ledger predates its split (it trained before it had one) keeps the units it held then for training. Or the
site names its evaluation records itself (``policy.eval_data``; their units may not be in its training data).
Evaluation units never train, so the evaluation has its own budget in the site's ledger: a unit is in the
evaluation account or the training one, never both (parallel composition). Since a unit's side is drawn
independently of every other unit, adding or removing one unit leaves the others' sides as they were, and the
site's guarantee for any unit is the larger of the two accounts' ε.

The release (common.federated_eval). In an evaluation round the site scores the adapter it received (the previous
round's model) before it trains, charges the evaluation to its ledger first (write-ahead), and releases its counts
with discrete Gaussian noise, inside the round's secure sum (the TrainReply under plain aggregation). A site with
no evaluation split, or whose evaluation budget is spent, releases noise on zero counts: the same shape and
distribution of noise, computed on no record, so what leaves never depends on whether or why it evaluated. A
release is kept per (run, round) and resent as is if the round is asked again: never a fresh draw.

The site's own, un-noised scores go to ``site-eval.jsonl`` in its state dir, one JSON line per evaluation, and
nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.policy import SitePolicy
from client.privacy import LEDGER_FILE, BudgetExhausted, PrivacyLedger
from client.release import adapter_digest
from client.site_report import write_site_report
from common.adapter import AdapterState
from common.audit import AuditLog
from common.config import ConfigError, RunSettings, unit_column
from common.data import DataError, Record, read_records
from common.encoding import EncodedData
from common.federated_eval import EvalPlan, causal_lm_counts, classification_counts, release
from common.files import private_dir, write_json

if TYPE_CHECKING:
    from client.site import Site

log = logging.getLogger("fedtune.client")
SPLIT_FILE = "eval-split.json"
RELEASES_FILE = "eval-releases.json"
SITE_SCORES_FILE = "site-eval.jsonl"
SPLIT_VERSION = 1
KEPT_RELEASES = 32


def unit_key(record: Record, column: str) -> str:
    """A unit's digest: its ``column`` value (a person), or the whole record (record units)."""
    text = record[column].strip() if column else json.dumps(record, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _drawn(fraction: float) -> bool:
    """True with probability ``fraction`` (to 2^-32), from OS entropy."""
    return secrets.randbelow(1 << 32) < round(fraction * (1 << 32))


def split_for_evaluation(records: list[Record], policy: SitePolicy, settings: RunSettings, state_dir: Path,
                         where: str) -> tuple[list[Record], list[Record]]:
    """(training records, evaluation records): by the site's stored split, or its own evaluation file. With a
    per-person unit at most the run's max-rows-per-unit (and the policy's) rows of a person are evaluated: the
    count sensitivity common.federated_eval assumes."""
    column = unit_column(policy.privacy_unit)
    if policy.eval_data:
        evaluation = read_records(policy.eval_data, task=policy.task)
        held_out = {unit_key(record, column) for record in _checked_units(evaluation, column, policy.eval_data)}
        if any(unit_key(record, column) in held_out for record in records):
            raise DataError(f"{where}: the evaluation file {policy.eval_data} shares units with the training data; "
                            "evaluation units must never train: remove them from one of the two files")
        train = records
    else:
        sides = _stored_split(records, column, policy.eval_fraction, state_dir)
        train = [record for record in records if not sides[unit_key(record, column)]]
        evaluation = [record for record in records if sides[unit_key(record, column)]]
        if not evaluation and policy.eval_fraction > 0:
            log.warning("%s: the evaluation split drew none of its units (eval-fraction %s, one draw per unit): it "
                        "releases noise only in evaluation rounds; a site this small cannot score the model", where,
                        policy.eval_fraction)
    if column:  # a person's first rows, at most the run's (and the site's) max-rows-per-unit
        most, seen = min(settings.train.max_rows_per_unit, policy.max_rows_per_unit), Counter[str]()
        capped = []
        for record in evaluation:
            seen[key := unit_key(record, column)] += 1
            if seen[key] <= most:
                capped.append(record)
        evaluation = capped
    return train, evaluation


def _checked_units(records: list[Record], column: str, where: str) -> list[Record]:
    if column and any(not record.get(column, "").strip() for record in records):
        raise DataError(f"{where}: every row must name its privacy unit {column!r}")
    return records


def _stored_split(records: list[Record], column: str, fraction: float, state_dir: Path) -> dict[str, bool]:
    """Each unit's side (True: evaluation), drawn once per unit and kept in the state dir."""
    path = state_dir / SPLIT_FILE
    stored: dict[str, Any] = {"version": SPLIT_VERSION, "fraction": fraction, "evaluation": [], "training": []}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            if stored.get("version") != SPLIT_VERSION or not isinstance(stored.get("evaluation"), list):
                raise ValueError(f"version {stored.get('version')}, expected {SPLIT_VERSION}")
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"the site's evaluation split {path} is unreadable ({exc}); restore it from backup "
                              "(deleting it would let evaluated units train)") from exc
        if stored["fraction"] != fraction:
            raise ConfigError(f"the site's evaluation split {path} was drawn with eval-fraction={stored['fraction']}; "
                              f"the policy now says {fraction}. The split is fixed once drawn (a unit that was "
                              "evaluated must never train): restore the setting, or start a new state dir")
    sides = dict.fromkeys(stored["evaluation"], True) | dict.fromkeys(stored["training"], False)
    new = {unit_key(record, column) for record in _checked_units(records, column, "the site's data")} - set(sides)
    # A site whose ledger predates its split may have trained on every unit it holds: those stay training units.
    trained_before = not path.exists() and (state_dir / LEDGER_FILE).exists()
    if new:
        sides |= {key: not trained_before and _drawn(fraction) for key in sorted(new)}
        private_dir(state_dir)
        write_json(path, {"version": SPLIT_VERSION, "fraction": fraction,
                          "evaluation": sorted(k for k, v in sides.items() if v),
                          "training": sorted(k for k, v in sides.items() if not v)})
    return sides


def _score(model: Any, data: EncodedData, settings: RunSettings, labels: int) -> tuple[list[int], dict[str, Any]]:
    """(the counts of the layout, the site's own un-noised scores)."""
    from common.causal_lm import score_generation
    from common.evaluation import evaluate, metrics
    from common.model import load_tokenizer

    if settings.task == "causal-lm":
        scores = score_generation(model, load_tokenizer(settings.model_path), data.dataset, data.answers,
                                  data.questions)
        losses, tokens, exact, rouge = zip(*scores.per_example, strict=True) if scores.per_example else ((),) * 4
        counts = causal_lm_counts(losses, tokens, exact, rouge, max_tokens=settings.data.max_length // 2)
        return counts, {k: v for k, v in scores.metrics().items() if k != "samples"}
    confusion = evaluate(model, data, labels)
    return classification_counts(confusion.confusion), metrics(confusion)


class EvaluationReleases:
    """The site's releases per (round, received adapter), as client.release keys its updates: a repeated request
    (a resumed run included) resends the same vector (0600)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / RELEASES_FILE

    def _all(self) -> dict[str, list[int]]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def find(self, server_round: int, digest: str) -> list[int] | None:
        return self._all().get(f"{server_round}/{digest}")

    def keep(self, server_round: int, digest: str, released: list[int]) -> None:
        kept = self._all()
        kept[f"{server_round}/{digest}"] = released
        write_json(self.path, dict(list(kept.items())[-KEPT_RELEASES:]))


def evaluation_release(site: Site, settings: RunSettings, plan: EvalPlan, ledger: PrivacyLedger | None,
                       received: AdapterState, received_model: Callable[[], Any], *, run_id: int,
                       server_round: int) -> list[int]:
    """What this site releases about the model it received (``received_model()`` builds it, once per round: the
    same model then trains), in an evaluation round (module docstring)."""
    releases, digest = EvaluationReleases(site.state_dir), adapter_digest(received)
    if (kept := releases.find(server_round, digest)) is not None:
        log.info("%s: round %d's evaluation was already released; resending it (no new ε)", site.name, server_round)
        return kept
    counts = [0] * plan.layout.slots
    evaluation = site.evaluation
    if evaluation is None or len(evaluation) == 0:
        log.info("%s: no evaluation records: releases noise only", site.name)
        evaluation = None
    elif ledger is not None:
        try:
            epsilon = ledger.charge_evaluation(run_id=run_id, server_round=server_round, rho=plan.rho,
                                               budget=plan.epsilon, delta=plan.delta)
        except BudgetExhausted as exc:
            log.warning("%s: evaluation budget spent (%s): releases noise only", site.name, exc)
            evaluation = None
        else:
            AuditLog(site.state_dir / "audit.jsonl").record(
                "evaluation-charged", run_id=run_id, round=server_round, epsilon=epsilon, rho=plan.rho,
                honest_sites=plan.honest_sites, own_noise_rho=plan.own_rho)  # its release alone: h·ρ
    if evaluation is not None:
        counts, own = _score(received_model(), evaluation, settings, len(site.labels))
        _append_own_scores(site.state_dir, {"run_id": run_id, "round": server_round, "model_round": server_round - 1,
                                            **own})
        write_site_report(site.state_dir, site.name, site.policy.task, site.state_dir / SITE_SCORES_FILE)
    released = release(counts, plan)
    releases.keep(server_round, digest, released)
    return released


def _append_own_scores(state_dir: Path, line: dict[str, Any]) -> None:
    """One line of the site's own, un-noised scores (never released), owner-only."""
    fd = os.open(state_dir / SITE_SCORES_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, default=float) + "\n")
