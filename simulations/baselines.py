"""What a federation is measured against (``fedtune simulate --baselines local,central``).

Both run in this process with the sites' own training code (``client.train.train_locally``), the
same training plan rule, DP setting, budget and privacy unit, the same number of rounds, and are
evaluated on the server's test split after every round:

    local     each site trains alone on its own records (the curve is the mean over sites)
    central   all sites' records pooled at one site: a reference a consortium cannot have
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from client.privacy import PrivacyLedger
from client.site import simulation_partitions
from client.train import train_locally
from common.config import TASK_METRICS, ConfigError, RunSettings, unit_column
from common.encoding import EncodedData, encode
from common.model import initial_model, load_tokenizer
from common.run_files import BaselinePoint, Baselines
from server.federation import server_test_split, test_scores
from simulations.report import metric_text, progress_bar

BASELINES = ("local", "central")


def run_baselines(which: tuple[str, ...], settings: RunSettings,
                  on_round: Callable[[str], None] = lambda text: None) -> Baselines:
    """Per-round server-test metrics of each requested baseline: {"local": [BaselinePoint(round, scores)]}.

    ``on_round`` gets a progress line after every round of every baseline."""
    labels, length, task = settings.data.labels, settings.data.max_length, settings.task
    tokenizer = load_tokenizer(settings.model_path)
    records, parts = simulation_partitions(settings.data, settings.federation.sites, task)
    column = unit_column(settings.privacy.unit)
    test = server_test_split(settings, tokenizer)
    if test is None:
        raise ConfigError("--baselines are scored on the coordinator's test set: give --test-data (not 'none')")
    curves: Baselines = {}
    if "local" in which:
        def progress(n: int) -> Callable[[str], None]:
            return lambda text: on_round(f"site-{n} alone ({n + 1}/{len(parts)}), {text}")

        per_site = [_train_alone(encode([records[i] for i in part], labels, tokenizer, length, f"site {n}",
                                        unit_column=column, task=task), test, settings, progress(n))
                    for n, part in enumerate(parts)]
        curves["local"] = [BaselinePoint(r + 1, {k: float(np.mean([site[r].scores[k] for site in per_site]))
                                                 for k, _ in TASK_METRICS[task]}) for r in range(len(per_site[0]))]
    if "central" in which:
        pooled = [records[i] for part in parts for i in part]
        curves["central"] = _train_alone(encode(pooled, labels, tokenizer, length, "pooled data", unit_column=column,
                                                task=task), test, settings,
                                         lambda text: on_round(f"all data pooled, {text}"))
    return curves


def _train_alone(data: EncodedData, test: EncodedData, settings: RunSettings,
                 on_round: Callable[[str], None]) -> list[BaselinePoint]:
    """``rounds`` rounds of the site's plan on one data set, each followed by a test evaluation."""
    labels = settings.data.labels
    model = initial_model(settings.model_path, labels, settings.lora, settings.task)
    curve = []
    with tempfile.TemporaryDirectory(prefix="fedtune-baseline-") as state:
        ledger = PrivacyLedger(Path(state) / "ledger.json", settings.privacy) if settings.privacy.enabled else None
        for server_round in range(1, settings.federation.rounds + 1):
            train_locally(model, data, settings.train, ledger=ledger, privacy=settings.privacy,
                          planned_rounds=settings.federation.rounds, server_round=server_round, run_id=0)
            scores = test_scores(model, test, settings)
            curve.append(BaselinePoint(server_round, {key: scores[key] for key, _ in TASK_METRICS[settings.task]}))
            rounds = settings.federation.rounds
            on_round(f"{progress_bar(server_round, rounds)} round {server_round}/{rounds}  "
                     + metric_text(scores, settings.task))
    return curve
