"""The federation's round loop, driven over Flower's Grid (simulation or deployment alike).

Each round: send the global adapter to the sites, aggregate their updates (and, in an evaluation round, the noisy
sum of their evaluations of the adapter they received), apply the mean delta, evaluate on the server's own test
split if it holds one, checkpoint, write a metrics line. The server never evaluates on a site's records: nothing
computed on them leaves a site outside DP.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import PreTrainedTokenizerBase

from common import __version__
from common.adapter import AdapterState, apply_delta, get_adapter_state, set_adapter_state, trainable_keys
from common.audit import AuditLog
from common.causal_lm import most_common_answer_scores, score_generation
from common.config import HEADLINE_METRIC, ConfigError, RunSettings, unit_name
from common.data import read_records, test_source
from common.encoding import EncodedData, encode
from common.evaluation import evaluate, majority_baseline, metrics
from common.federated_eval import decode, plan_evaluation, thin_evaluation
from common.files import file_sha256
from common.model import base_model_sha256, initial_model, load_tokenizer
from common.passport import build_passport, load_signing_key, sign_passport
from common.registry import load_registry
from common.run_files import (
    FederatedScores,
    MetricsLine,
    PrivacyFile,
    PrivacyReport,
    RunInfo,
    append_metrics,
    checkpoint_name,
    drop_partial_metrics_line,
    read_metrics,
    read_privacy,
    read_record,
    read_round_info,
    write_privacy,
    write_record,
    write_run_info,
)
from server.checkpoint import load_optimizer_state, publish_final, save_checkpoint
from server.ledger_watch import EPSILON_REFUSED, LedgerWatch
from server.optimizer import ServerOptimizer
from server.secure_agg import SecureAggregation, Standing
from server.selection import best_round, stalled
from server.strategy import Aggregator, PlainAggregation, RoundOutcome, RoundSpec

log = logging.getLogger("fedtune.server")
STANDING_FILE = "secagg-standing.json"
"""Secure aggregation's proven cheats and unsettled disputes: who the run keeps out (--resume reads it)."""


SELECTED_STAGING = "final/selected"
"""Where the chosen checkpoint is re-signed before it is published as final/adapter."""


class FederationFailed(RuntimeError):
    """No round changed the model (every round had too few contributing sites)."""


def choose_aggregator(settings: RunSettings, spec: RoundSpec, watch: LedgerWatch) -> Aggregator:
    if settings.federation.secure_aggregation:
        distributed = settings if settings.privacy.dp_mode == "distributed" else None
        if distributed is not None:
            log.info("DISTRIBUTED DP: each round is one DP-SGD step of the pooled data, the sites sharing its noise "
                     "inside secure aggregation; the server takes the step with Adam (η = %g)",
                     settings.step_optimizer().learning_rate)
        return SecureAggregation(spec, settings.secagg, load_registry(settings.secagg.registry), watch, distributed)
    log.warning("PLAIN AGGREGATION (federation.secure-aggregation=false): the server sees every site's update")
    return PlainAggregation(spec, settings.secagg, watch)


def wait_for_sites(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def server_test_split(settings: RunSettings, tokenizer: PreTrainedTokenizerBase) -> EncodedData | None:
    """The server's held-out examples (the first data.test-examples of them, when set), encoded for its task;
    None when it holds none."""
    if (source := test_source(settings.data)) is None:
        return None
    records = read_records(source, split="test", task=settings.task)
    if settings.data.test_examples:
        records = records[:settings.data.test_examples]
    return encode(records, settings.data.labels, tokenizer, settings.data.max_length, "server test split",
                  task=settings.task)


def test_scores(model: PeftModel, test: EncodedData, settings: RunSettings) -> dict[str, Any]:
    """The model's metrics on the server's test split: classification counts, or causal-lm generation."""
    if settings.task == "causal-lm":
        return score_generation(model, load_tokenizer(settings.model_path), test.dataset, test.answers,
                                test.questions).metrics()
    return metrics(evaluate(model, test, len(settings.data.labels)))


def resume_point(checkpoint: Path, state: AdapterState) -> tuple[AdapterState, int, str]:
    """(adapter state, its round, its sha256) of a checkpoint to continue from; checked against the model."""
    info = read_round_info(checkpoint)
    weights = checkpoint / "adapter_model.safetensors"
    if file_sha256(weights) != info.adapter_sha256:
        raise ConfigError(f"checkpoint {checkpoint} does not match its round.json checksum: it was altered")
    saved = {key: value.astype(np.float32) for key, value in load_file(str(weights)).items()}
    if set(saved) != set(state) or any(saved[k].shape != state[k].shape for k in state):
        raise ConfigError(f"checkpoint {checkpoint} is not an adapter of this model and LoRA configuration")
    return saved, info.round, info.adapter_sha256


def seal_passport(key, base_sha: str, server_round: int, contributors: int, epsilon: dict, unit: str,
                  audit: dict, directory: Path, selection: dict | None = None, own_noise: dict | None = None) -> None:
    """Sign the checkpoint being written in ``directory`` (before it is renamed into place), or the final adapter
    chosen on the federated evaluation (``selection``). ``own_noise``: distributed DP's ε of each site's own noise."""
    sign_passport(directory, build_passport(directory, base_model_sha256=base_sha, server_round=server_round,
                                            contributors=contributors, epsilon=epsilon, privacy_unit=unit,
                                            fedtune_version=__version__, audit=audit, selection=selection,
                                            own_noise_epsilon=own_noise), key)


def restore_metrics(out_dir: Path, checkpoint: Path) -> None:
    """A crash between a checkpoint and its metrics line loses the line, not the round: write it back."""
    info = read_round_info(checkpoint)
    drop_partial_metrics_line(out_dir)  # a half-written last line from the crash
    if info.metrics is not None and all(line.round != info.round for line in read_metrics(out_dir)):
        append_metrics(out_dir, info.metrics)


class Federation:
    """One run's state across its rounds, and each step of a round.

    A round: wait for the sites, let the aggregator run its exchanges, record what each site said
    (failures, ε), step the model with the mean update, evaluate on the server's test split,
    commit (the checkpoint first: it carries the round's metrics line), then publish the line.
    """

    def __init__(self, grid: Grid, settings: RunSettings) -> None:
        self.grid, self.settings = grid, settings
        self.out_dir = settings.out_dir.resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(self.out_dir / "audit.jsonl")
        if not settings.privacy.enabled:
            log.warning("DIFFERENTIAL PRIVACY IS OFF (privacy.enabled=false): sites' updates are not DP")
        self.labels = settings.data.labels
        if settings.task == "classification" and not self.labels:
            raise ConfigError("data.labels must list the federation's labels: the server never sees the sites' data")
        self.test = server_test_split(settings, load_tokenizer(settings.model_path))
        self.signing_key = load_signing_key(Path(settings.passport_key)) if settings.passport_key else None
        self.base_sha = base_model_sha256(settings.model_path) if self.signing_key else ""
        self.model = initial_model(settings.model_path, self.labels, settings.lora, settings.task)
        self.state = get_adapter_state(self.model)
        self.keys = trainable_keys(self.state, settings.lora.aggregation)
        update_size = sum(self.state[key].size for key in self.keys)
        self.evaluation = plan_evaluation(settings)
        if (thin := thin_evaluation(self.evaluation, settings.federation.rounds)) is not None:
            log.warning(thin)
        spec = RoundSpec(update_size, settings.secagg.max_examples, settings.federation.min_sites,
                         settings.federation.train_timeout, settings.federation.stage_timeout, self.evaluation)
        self.run_id = grid.run.run_id
        self.watch = LedgerWatch(self.out_dir, self.signing_key, self.run_id)
        self.aggregator = choose_aggregator(settings, spec, self.watch)
        self.update_size = update_size
        self.optimizer = ServerOptimizer(settings.step_optimizer(), update_size)
        self.privacy: dict[str, PrivacyReport] = {}
        self.unit = unit_name(settings.privacy.unit)
        self.run_info = RunInfo(
            task=settings.task, labels=self.labels, majority_baseline=self._floor(),
            aggregation=self.aggregator.name, lora=settings.lora.aggregation, dp=settings.privacy.enabled,
            update_values=update_size, sites=settings.federation.sites, rounds=settings.federation.rounds,
            privacy_unit=settings.privacy.unit, server_optimizer=settings.step_optimizer().optimizer,
            epsilon_budget=settings.privacy.epsilon if settings.privacy.enabled else None,
            select_round=settings.federation.select_round)
        write_run_info(self.out_dir, self.run_info)
        self.last_round, self.updated_rounds = 0, 0
        self.checkpoint, self.parent = self._resume() if settings.resume_from else self._start()
        self.model_round = self.last_round
        """The round whose step made the current model (what the sites receive next)."""
        self.uncommitted: tuple[int, RoundOutcome, MetricsLine] | None = None
        """The latest round that moved the model, when it is not checkpointed yet (checkpoint-every > 1)."""

    def _start(self) -> tuple[Path, str]:
        """Round 0: the initial adapter, evaluated and checkpointed."""
        append_metrics(self.out_dir, MetricsLine(round=0, server=self._evaluate()))
        checkpoint = save_checkpoint(self.out_dir, 0, self.model, self.state, contributors=0, parent_sha256=None)
        parent = file_sha256(checkpoint / "adapter_model.safetensors")
        self.audit.record("run-started", run_id=self.run_id, aggregation=self.aggregator.name,
                          dp=self.settings.privacy.enabled, rounds=self.settings.federation.rounds,
                          initial_sha256=parent)
        return checkpoint, parent

    def _resume(self) -> tuple[Path, str]:
        """The adapter, server-optimizer state, metrics and privacy reports of the checkpoint to continue from."""
        checkpoint = Path(self.settings.resume_from)
        self.state, self.last_round, parent = resume_point(checkpoint, self.state)
        set_adapter_state(self.model, self.state)
        try:
            self.optimizer = ServerOptimizer(self.settings.step_optimizer(), self.update_size,
                                             load_optimizer_state(checkpoint))
        except ValueError as exc:
            raise ConfigError(f"checkpoint {checkpoint}: {exc}") from exc
        restore_metrics(self.out_dir, checkpoint)
        if (privacy := read_privacy(self.out_dir)) is not None:
            self.privacy = dict(privacy.sites)
        if isinstance(self.aggregator, SecureAggregation) and (self.out_dir / STANDING_FILE).exists():
            self.aggregator.standing = read_record(self.out_dir / STANDING_FILE, Standing)
        self.audit.record("run-resumed", run_id=self.run_id, from_round=self.last_round, checkpoint_sha256=parent)
        return checkpoint, parent

    def run(self) -> Path:
        """Every remaining round; the final adapter's directory."""
        outcome = None
        federation = self.settings.federation
        for server_round in range(self.last_round + 1, federation.rounds + 1):
            outcome = self.play_round(server_round)
            if server_round < federation.rounds and stalled(read_metrics(self.out_dir), self.settings.task,
                                                            federation.early_stop):
                log.info("early stop after round %d: %d federated evaluations in a row did not improve; the sites "
                         "keep the budget of the rounds not played", server_round, federation.early_stop)
                self.audit.record("run-stopped-early", run_id=self.run_id, round=server_round,
                                  patience=federation.early_stop)
                break
        if self.uncommitted is not None:  # the model moved after the last checkpoint (a later round failed)
            self._commit(*self.uncommitted)
        if self.updated_rounds == 0 and not self.settings.resume_from:
            self.audit.record("run-failed", run_id=self.run_id, reason="no round changed the model")
            kinds = sorted({failure.kind for failure in outcome.failures}) if outcome else []
            spent = ("; a site's ledger keeps the ε it spent in earlier rounds and runs and is never reset (simulated "
                     "sites keep theirs under OUT/sites: simulate into a new --out for fresh sites)"
                     if "budget-exhausted" in kinds else "")
            raise FederationFailed(f"no round changed the model; the sites' failures were {kinds} (see metrics.jsonl)"
                                   + spent)
        final = publish_final(self.out_dir, self._selected())
        shutil.rmtree(self.out_dir / SELECTED_STAGING, ignore_errors=True)
        info = read_round_info(final)
        self.audit.record("run-finished", run_id=self.run_id, final_sha256=info.adapter_sha256, final_round=info.round)
        return final

    def _selected(self) -> Path:
        """The checkpoint to publish: the last one, or (select-round best) the best on the federated evaluation,
        marked in run.json and re-signed with the whole run's ε and why it was chosen."""
        if self.settings.federation.select_round != "best":
            return self.checkpoint
        selection = best_round(read_metrics(self.out_dir), self.settings.task)
        if selection is None:
            log.warning("select-round best: no federated evaluation has a score; the last checkpoint is published")
            return self.checkpoint
        chosen = self.out_dir / "checkpoints" / checkpoint_name(selection.round)
        log.info("final adapter: %s", selection.describe())
        self.run_info = dataclasses.replace(self.run_info, selected_round=selection.round,
                                            selected_because=selection.describe())
        write_run_info(self.out_dir, self.run_info)
        self.audit.record("round-selected", run_id=self.run_id, **selection.passport_entry())
        if self.signing_key:
            staged = self.out_dir / SELECTED_STAGING
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(chosen, staged)
            seal_passport(self.signing_key, self.base_sha, selection.round, read_round_info(chosen).contributors,
                          self._epsilon(), self.unit, self._audits(), staged, selection=selection.passport_entry(),
                          own_noise=self._own_noise_epsilon())
            return staged
        return chosen

    def play_round(self, server_round: int) -> RoundOutcome:
        started = time.monotonic()
        outcome = self._collect(server_round)
        if outcome.mean_delta is not None:  # a new model version
            self.state = apply_delta(self.state, self.optimizer.step(outcome.mean_delta), self.keys)
            set_adapter_state(self.model, self.state)
            self.updated_rounds += 1
        due = self._checkpoint_due(server_round)
        line = self._metrics_line(server_round, outcome, self._evaluate() if due else {},
                                  round(time.monotonic() - started, 2))
        if outcome.mean_delta is not None:
            self.model_round = server_round
            self.uncommitted = (server_round, outcome, line) if not due else None
            if due:
                self._commit(server_round, outcome, line)
        line = dataclasses.replace(line, checkpoint=self.checkpoint.name)
        append_metrics(self.out_dir, line)
        write_privacy(self.out_dir, PrivacyFile(self.settings.privacy.enabled, self.privacy))
        name = HEADLINE_METRIC[self.settings.task]
        federated = line.federated_evaluation.scores.get(name) if line.federated_evaluation else None
        log.info("round %d: %d site(s), server %s %s, federated %s (round %d's model) %s", server_round,
                 outcome.contributors, name, _shown(line.server.get(name)), name,
                 line.federated_evaluation.model_round if line.federated_evaluation else server_round - 1,
                 _shown(federated))
        return outcome

    def _checkpoint_due(self, server_round: int) -> bool:
        """Checkpoint (and score on the server's test split) this round: every K-th round and the last."""
        federation = self.settings.federation
        return server_round % federation.checkpoint_every == 0 or server_round == federation.rounds

    def _collect(self, server_round: int) -> RoundOutcome:
        """Wait for the sites (all of them before the first round played here), run the aggregator's
        exchanges, and keep what each site reported about its privacy."""
        federation = self.settings.federation
        wanted = federation.sites if server_round == self.last_round + 1 else federation.min_sites
        nodes = wait_for_sites(self.grid, wanted, federation.site_wait)
        kept_out = self._kept_out()
        outcome = self.aggregator.run_round(self.grid, nodes, self.state, server_round)
        if isinstance(self.aggregator, SecureAggregation):  # cheats stay out of the run's later rounds
            write_record(self.out_dir / STANDING_FILE, self.aggregator.standing)
            for site, why in sorted(self._kept_out().items()):
                if site not in kept_out:
                    self.audit.record("site-kept-out", run_id=self.run_id, round=server_round, site=site, reason=why,
                                      proof=self.aggregator.standing.proven.get(site, {}).get("proof"))
        for failure in outcome.failures:
            log.warning("round %d: site %s failed (%s): %s", server_round, failure.site, failure.kind, failure.detail)
            if failure.kind == EPSILON_REFUSED:  # its report is in neither privacy.json nor any passport
                self.audit.record("privacy-report-refused", run_id=self.run_id, round=server_round, site=failure.site,
                                  reason=failure.detail)
        self.watch.record(server_round, outcome.privacy)
        for site, report in outcome.privacy.items():  # a report without an audit keeps the site's latest one
            kept = self.privacy.get(site)
            audit = kept.released_audit() if kept and report.released_audit() is None else None
            self.privacy[site] = dataclasses.replace(report, **audit) if audit else report
        details = outcome.details
        self.audit.record("round", run_id=self.run_id, round=server_round, nodes=len(nodes),
                          contributors=outcome.contributors, survivors=details.survivors if details else None,
                          dropped=details.dropped if details else None,
                          failures=[{"site": f.site, "kind": f.kind} for f in outcome.failures],
                          model_updated=outcome.mean_delta is not None)
        return outcome

    def _kept_out(self) -> dict[str, str]:
        return self.aggregator.standing.kept_out() if isinstance(self.aggregator, SecureAggregation) else {}

    def _metrics_line(self, server_round: int, outcome: RoundOutcome, server: dict[str, Any],
                      duration_s: float) -> MetricsLine:
        return MetricsLine(round=server_round, server=server, aggregation=self.aggregator.name,
                           contributors=outcome.contributors, failures=tuple(outcome.failures),
                           model_updated=outcome.mean_delta is not None, secure_aggregation=outcome.details,
                           dp=self.settings.privacy.enabled, privacy_unit=self.unit, epsilon=self._epsilon(),
                           duration_s=duration_s, federated_evaluation=self._federated(server_round, outcome))

    def _federated(self, server_round: int, outcome: RoundOutcome) -> FederatedScores | None:
        """The sites' evaluation of the model they received (round − 1's), from the noisy sum alone."""
        if self.evaluation is None or not outcome.evaluation_sum or not outcome.evaluated_sites:
            return None
        return decode(outcome.evaluation_sum, outcome.evaluated_sites, self.evaluation.shared(outcome.evaluation_share),
                      model_round=self.model_round,  # the model the sites received
                      max_tokens=self.settings.data.max_length // 2)

    def _epsilon(self) -> dict[str, float | None]:
        return {site: report.epsilon for site, report in sorted(self.privacy.items())}

    def _own_noise_epsilon(self) -> dict[str, float | None]:
        """Distributed DP: each site's ε of its own noise alone ({} when no site reported one)."""
        own = {site: report.own_noise_epsilon for site, report in sorted(self.privacy.items())}
        return own if any(eps is not None for eps in own.values()) else {}

    def _audits(self) -> dict[str, dict[str, Any]]:
        """Each auditing site's privacy audit, as it reported it (client/canaries.py)."""
        return {site: audit for site, report in sorted(self.privacy.items()) if (audit := report.released_audit())}

    def _evaluate(self) -> dict[str, Any]:
        """The server's own test split only ({} without one): nothing computed on a site's records leaves it
        outside DP."""
        return test_scores(self.model, self.test, self.settings) if self.test is not None else {}

    def _floor(self) -> dict[str, float]:
        """What the test split's most common label (answer) scores: the floor a model must beat ({} without one)."""
        if self.test is None:
            return {}
        if self.settings.task == "causal-lm":
            return most_common_answer_scores(self.test.answers)
        return majority_baseline(self.test.labels, len(self.labels))

    def _commit(self, server_round: int, outcome: RoundOutcome, line: MetricsLine) -> None:
        """The checkpoint is the commit point: it carries the round's metrics line and its signed passport."""
        seal = functools.partial(seal_passport, self.signing_key, self.base_sha, server_round, outcome.contributors,
                                 self._epsilon(), self.unit, self._audits(),
                                 own_noise=self._own_noise_epsilon()) if self.signing_key else None
        self.checkpoint = save_checkpoint(
            self.out_dir, server_round, self.model, self.state, contributors=outcome.contributors,
            parent_sha256=self.parent, metrics=dataclasses.replace(line, checkpoint=checkpoint_name(server_round)),
            seal=seal, optimizer_state=self.optimizer.state())
        self.parent = file_sha256(self.checkpoint / "adapter_model.safetensors")
        self.audit.record("checkpoint", round=server_round, adapter_sha256=self.parent,
                          passport=self.signing_key is not None)


def _shown(score: float | None) -> str:
    return "-" if score is None else f"{score:.3f}"


def run_federation(grid: Grid, settings: RunSettings) -> Path:
    """Run every round (from a checkpoint when resuming); return the final adapter's directory."""
    return Federation(grid, settings).run()
