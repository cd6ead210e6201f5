"""The federation's round loop, driven over Flower's Grid (simulation or deployment alike).

Each round: send the global adapter to the sites, aggregate their updates, apply the mean
delta, evaluate (server test split + sites' held-out data), checkpoint, write a metrics line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.serverapp import Grid

from common.adapter import apply_delta, get_adapter_state, set_adapter_state, trainable_keys
from common.config import ConfigError, DataSettings, RunSettings
from common.data import DRUGREVIEW, encode, read_records
from common.evaluation import evaluate, majority_baseline, metrics
from common.model import build_model, load_tokenizer
from common.registry import load_registry
from server.checkpoint import append_metrics, publish_final, save_checkpoint, write_json
from server.secure_agg import SecureAggregation
from server.strategy import Aggregator, PlainAggregation, RoundSpec

log = logging.getLogger("fedtune.server")
ROUND_TIMEOUT_S = 3600.0
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


def run_federation(grid: Grid, settings: RunSettings) -> Path:
    """Run every round; return the final adapter's directory."""
    out_dir = settings.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not settings.privacy.enabled:
        log.warning("DIFFERENTIAL PRIVACY IS OFF (privacy.enabled=false): sites' updates are not DP")

    labels = settings.data.labels
    if not labels:
        raise ConfigError("data.labels must list the federation's labels: the server never sees the sites' data")
    test = encode(read_records(test_source(settings.data), split="test"), labels, load_tokenizer(settings.model_path),
                  settings.data.max_length, "server test split")
    baseline = majority_baseline(test.labels, len(labels))

    model = build_model(settings.model_path, len(labels), settings.lora)
    state = get_adapter_state(model)
    keys = trainable_keys(state, settings.lora.aggregation)
    update_size = sum(state[key].size for key in keys)
    spec = RoundSpec(update_size, len(labels), settings.federation.min_sites, ROUND_TIMEOUT_S)
    aggregator = choose_aggregator(settings, spec)
    write_json(out_dir / "run.json", {
        "labels": labels, "majority_baseline": baseline, "aggregation": aggregator.name,
        "lora": settings.lora.aggregation, "dp": settings.privacy.enabled, "update_values": update_size,
        "sites": settings.federation.sites, "rounds": settings.federation.rounds,
    })
    append_metrics(out_dir, {"round": 0, "server": metrics(evaluate(model, test, len(labels)))})
    checkpoint = save_checkpoint(out_dir, 0, model, state, {"contributors": 0})

    privacy: dict[str, dict] = {}
    updated_rounds = 0
    for server_round in range(1, settings.federation.rounds + 1):
        started = time.monotonic()
        nodes = wait_for_sites(grid, settings.federation.sites, NODE_WAIT_S)
        outcome = aggregator.run_round(grid, nodes, state, server_round)
        for failure in outcome.failures:
            log.warning("round %d: site %s failed (%s): %s", server_round, failure["site"], failure["kind"],
                        failure["detail"])
        privacy.update(outcome.privacy)
        if outcome.mean_delta is not None:
            state = apply_delta(state, outcome.mean_delta, keys)
            set_adapter_state(model, state)
            updated_rounds += 1
        line = {
            "round": server_round,
            "aggregation": aggregator.name,
            "contributors": outcome.contributors,
            "failures": outcome.failures,
            "model_updated": outcome.mean_delta is not None,
            "train_loss": outcome.train_loss,
            "server": metrics(evaluate(model, test, len(labels))),
            "federated": metrics(outcome.evaluation) if outcome.evaluation else None,
            "secure_aggregation": outcome.details or None,
            "epsilon": {site: report.get("epsilon") for site, report in sorted(privacy.items())},
        }
        checkpoint = save_checkpoint(out_dir, server_round, model, state, {"contributors": outcome.contributors})
        line["duration_s"] = round(time.monotonic() - started, 2)
        append_metrics(out_dir, line)
        write_json(out_dir / "privacy.json", {"dp": settings.privacy.enabled, "sites": privacy})
        log.info("round %d: %d site(s), server macro-F1 %.3f", server_round, outcome.contributors,
                 line["server"]["macro_f1"])
    if updated_rounds == 0:
        kinds = sorted({failure["kind"] for failure in outcome.failures})
        raise FederationFailed(f"no round changed the model; the sites' failures were {kinds} (see metrics.jsonl)")
    return publish_final(out_dir, checkpoint)
