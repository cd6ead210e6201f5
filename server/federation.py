"""The federation's round loop, driven over Flower's Grid (simulation or deployment alike).

Each round: send the global adapter to the sites, aggregate their updates, apply the mean
delta, evaluate on the server's own test split, checkpoint, write a metrics line. The server
never evaluates on a site's records: nothing computed on them leaves a site outside DP.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.serverapp import Grid
from safetensors.numpy import load_file

from common.adapter import AdapterState, apply_delta, get_adapter_state, set_adapter_state, trainable_keys
from common.audit import AuditLog
from common.config import ConfigError, DataSettings, RunSettings, unit_name
from common.data import DRUGREVIEW, encode, read_records
from common.evaluation import evaluate, majority_baseline, metrics
from common.files import file_sha256, write_json
from common.model import base_model_sha256, build_model, load_tokenizer
from common.passport import build_passport, load_signing_key, sign_passport
from common.registry import load_registry
from fedtune import __version__
from server.checkpoint import append_metrics, load_optimizer_state, publish_final, save_checkpoint
from server.optimizer import ServerOptimizer
from server.secure_agg import SecureAggregation
from server.strategy import Aggregator, PlainAggregation, RoundSpec

log = logging.getLogger("fedtune.server")
NODE_WAIT_S = 120.0


class FederationFailed(RuntimeError):
    """No round changed the model (every round had too few contributing sites)."""


def choose_aggregator(settings: RunSettings, spec: RoundSpec) -> Aggregator:
    if settings.federation.secure_aggregation:
        return SecureAggregation(spec, settings.secagg, load_registry(settings.secagg.registry))
    log.warning("PLAIN AGGREGATION (federation.secure-aggregation=false): the server sees every site's update")
    return PlainAggregation(spec)


def wait_for_sites(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def test_source(data: DataSettings) -> str:
    """The server's own held-out data: data.test-source, or the drug reviews' test split."""
    if data.test_source:
        return data.test_source
    if data.source == DRUGREVIEW:
        return DRUGREVIEW
    raise ConfigError("data.test-source must name the server's test file (CSV/JSONL) when data.source is a file")


def resume_point(checkpoint: Path, state: AdapterState) -> tuple[AdapterState, int, str]:
    """(adapter state, its round, its sha256) of a checkpoint to continue from; checked against the model."""
    info = json.loads((checkpoint / "round.json").read_text())
    weights = checkpoint / "adapter_model.safetensors"
    if file_sha256(weights) != info["adapter_sha256"]:
        raise ConfigError(f"checkpoint {checkpoint} does not match its round.json checksum: it was altered")
    saved = {key: value.astype(np.float32) for key, value in load_file(str(weights)).items()}
    if set(saved) != set(state) or any(saved[k].shape != state[k].shape for k in state):
        raise ConfigError(f"checkpoint {checkpoint} is not an adapter of this model and LoRA configuration")
    return saved, int(info["round"]), info["adapter_sha256"]


def seal_passport(key, base_sha: str, server_round: int, contributors: int, epsilon: dict, unit: str,
                  directory: Path) -> None:
    """Sign the checkpoint being written in ``directory`` (before it is renamed into place)."""
    sign_passport(directory, build_passport(directory, base_model_sha256=base_sha, server_round=server_round,
                                            contributors=contributors, epsilon=epsilon, privacy_unit=unit,
                                            fedtune_version=__version__), key)


def restore_metrics(out_dir: Path, checkpoint: Path) -> None:
    """A crash between a checkpoint and its metrics line loses the line, not the round: write it back."""
    path = out_dir / "metrics.jsonl"
    info = json.loads((checkpoint / "round.json").read_text())
    lines = path.read_text().splitlines() if path.exists() else []
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):  # a half-written last line from the crash
        path.write_text(text[: text.rfind("\n") + 1])
        lines = lines[:-1]
    if "metrics" in info and all(json.loads(x)["round"] != info["round"] for x in lines):
        append_metrics(out_dir, info["metrics"])


def run_federation(grid: Grid, settings: RunSettings) -> Path:
    """Run every round (from a checkpoint when resuming); return the final adapter's directory."""
    out_dir = settings.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(out_dir / "audit.jsonl")
    if not settings.privacy.enabled:
        log.warning("DIFFERENTIAL PRIVACY IS OFF (privacy.enabled=false): sites' updates are not DP")

    labels = settings.data.labels
    if not labels:
        raise ConfigError("data.labels must list the federation's labels: the server never sees the sites' data")
    test = encode(read_records(test_source(settings.data), split="test"), labels, load_tokenizer(settings.model_path),
                  settings.data.max_length, "server test split")
    baseline = majority_baseline(test.labels, len(labels))
    signing_key = load_signing_key(Path(settings.passport_key)) if settings.passport_key else None
    base_sha = base_model_sha256(settings.model_path) if signing_key else ""

    model = build_model(settings.model_path, len(labels), settings.lora)
    state = get_adapter_state(model)
    keys = trainable_keys(state, settings.lora.aggregation)
    update_size = sum(state[key].size for key in keys)
    spec = RoundSpec(update_size, settings.secagg.max_examples, settings.federation.min_sites,
                     settings.federation.train_timeout, settings.federation.stage_timeout)
    aggregator = choose_aggregator(settings, spec)
    run_id = grid.run.run_id
    write_json(out_dir / "run.json", {
        "labels": labels, "majority_baseline": baseline, "aggregation": aggregator.name,
        "lora": settings.lora.aggregation, "dp": settings.privacy.enabled, "update_values": update_size,
        "sites": settings.federation.sites, "rounds": settings.federation.rounds,
        "privacy_unit": settings.privacy.unit, "epsilon_budget": settings.privacy.epsilon if settings.privacy.enabled
        else None, "server_optimizer": settings.server.optimizer,
    })
    privacy: dict[str, dict] = {}
    server_optimizer = ServerOptimizer(settings.server, update_size)
    if settings.resume_from:
        state, last_round, parent = resume_point(Path(settings.resume_from), state)
        set_adapter_state(model, state)
        checkpoint = Path(settings.resume_from)
        try:
            server_optimizer = ServerOptimizer(settings.server, update_size, load_optimizer_state(checkpoint))
        except ValueError as exc:
            raise ConfigError(f"checkpoint {checkpoint}: {exc}") from exc
        restore_metrics(out_dir, checkpoint)
        if (out_dir / "privacy.json").exists():
            privacy = json.loads((out_dir / "privacy.json").read_text())["sites"]
        audit.record("run-resumed", run_id=run_id, from_round=last_round, checkpoint_sha256=parent)
    else:
        last_round = 0
        append_metrics(out_dir, {"round": 0, "server": metrics(evaluate(model, test, len(labels)))})
        checkpoint = save_checkpoint(out_dir, 0, model, state, {"contributors": 0, "parent_sha256": None})
        parent = file_sha256(checkpoint / "adapter_model.safetensors")
        audit.record("run-started", run_id=run_id, aggregation=aggregator.name, dp=settings.privacy.enabled,
                     rounds=settings.federation.rounds, initial_sha256=parent)

    updated_rounds = 0
    for server_round in range(last_round + 1, settings.federation.rounds + 1):
        started = time.monotonic()
        # The first round waits for every expected site; later rounds go on with whoever is connected.
        wanted = settings.federation.sites if server_round == last_round + 1 else settings.federation.min_sites
        nodes = wait_for_sites(grid, wanted, NODE_WAIT_S)
        outcome = aggregator.run_round(grid, nodes, state, server_round)
        for failure in outcome.failures:
            log.warning("round %d: site %s failed (%s): %s", server_round, failure["site"], failure["kind"],
                        failure["detail"])
        privacy.update({site: report.as_dict() for site, report in outcome.privacy.items()})
        epsilon = {site: report.get("epsilon") for site, report in sorted(privacy.items())}
        line = {
            "round": server_round,
            "aggregation": aggregator.name,
            "contributors": outcome.contributors,
            "failures": outcome.failures,
            "model_updated": outcome.mean_delta is not None,
            "secure_aggregation": outcome.details or None,
            "dp": settings.privacy.enabled,
            "privacy_unit": unit_name(settings.privacy.unit),
            "epsilon": epsilon,
        }
        audit.record("round", run_id=run_id, round=server_round, nodes=len(nodes), contributors=outcome.contributors,
                     survivors=outcome.details.get("survivors"), dropped=outcome.details.get("dropped"),
                     failures=[{k: f[k] for k in ("site", "kind")} for f in outcome.failures],
                     model_updated=outcome.mean_delta is not None)
        if outcome.mean_delta is not None:  # a new model version
            state = apply_delta(state, server_optimizer.step(outcome.mean_delta), keys)
            set_adapter_state(model, state)
            updated_rounds += 1
        line["server"] = server_metrics = metrics(evaluate(model, test, len(labels)))
        line["duration_s"] = round(time.monotonic() - started, 2)
        if outcome.mean_delta is not None:  # the checkpoint is the commit point: it carries its metrics line
            seal = functools.partial(seal_passport, signing_key, base_sha, server_round, outcome.contributors,
                                     epsilon, unit_name(settings.privacy.unit)) if signing_key else None
            checkpoint = save_checkpoint(out_dir, server_round, model, state, {
                "contributors": outcome.contributors, "parent_sha256": parent, "metrics": line | {
                    "checkpoint": f"round-{server_round:04d}"}}, seal,
                optimizer_state=server_optimizer.state() if settings.server.optimizer != "fedavg" else None)
            parent = file_sha256(checkpoint / "adapter_model.safetensors")
            audit.record("checkpoint", round=server_round, adapter_sha256=parent, passport=signing_key is not None)
        line["checkpoint"] = checkpoint.name
        append_metrics(out_dir, line)
        write_json(out_dir / "privacy.json", {"dp": settings.privacy.enabled, "sites": privacy})
        log.info("round %d: %d site(s), server macro-F1 %.3f", server_round, outcome.contributors,
                 server_metrics["macro_f1"])
    if updated_rounds == 0 and not settings.resume_from:
        audit.record("run-failed", run_id=run_id, reason="no round changed the model")
        kinds = sorted({failure["kind"] for failure in outcome.failures})
        raise FederationFailed(f"no round changed the model; the sites' failures were {kinds} (see metrics.jsonl)")
    final = publish_final(out_dir, checkpoint)
    audit.record("run-finished", run_id=run_id, final_sha256=parent, final_round=json.loads(
        (checkpoint / "round.json").read_text())["round"])
    return final
