"""``federated-eval``: how close the coordinator's federated estimate (common/federated_eval.py) is to the truth.

    python -m simulations.benchmarks.federated_eval noise --labels 77 --sites 5 --per-site 400 --evaluations 20
    python -m simulations.benchmarks.federated_eval noise ... --honest-sites 5    # distributed DP's shared noise
    python -m simulations.benchmarks.federated_eval run OUT

``noise``: synthetic confusion matrices (each example right with probability --accuracy, else a random other label)
released with the sites' real sampler (OS entropy) and decoded with the coordinator's real decoder: the mean gap
|federated − true| of accuracy and macro-F1 over --trials, and how often the 95 % interval held the truth.
``run``: a finished ``fedtune simulate`` run. Each round's federated scores (of the model the sites received)
against the sites' exact scores of the same model on their evaluation splits (their own site-eval.jsonl, never
sent; pooled by examples) and the coordinator's test score, if it had a test set.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from common.config import RunSettings
from common.evaluation import EvalCounts, metrics
from common.federated_eval import classification_counts, decode, plan_evaluation, release
from common.run_files import read_metrics
from fedtune.cli import default_run_config


def synthetic_confusion(examples: int, labels: int, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    truth = rng.integers(labels, size=examples)
    wrong = (truth + rng.integers(1, labels, size=examples)) % labels
    predicted = np.where(rng.random(examples) < accuracy, truth, wrong)
    confusion = np.zeros((labels, labels), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    return confusion


def noise_row(args: argparse.Namespace) -> str:
    names = ",".join(f"l{i}" for i in range(args.labels))
    settings = RunSettings.from_flat(default_run_config() | {
        "data.labels": names, "federation.rounds": args.evaluations, "federation.eval-every": 1,
        "federation.eval-epsilon": args.eval_epsilon, "federation.secure-aggregation": False})
    whole = plan_evaluation(settings)
    assert whole is not None
    plan = whole.shared(args.honest_sites)  # distributed DP: each site adds 1/h of the noise
    rng = np.random.default_rng(args.seed)  # the synthetic truth only; the privacy noise is the sites' (OS entropy)
    gaps: dict[str, list[float]] = {"accuracy": [], "macro_f1": []}
    covered = dict.fromkeys(gaps, 0)
    withheld = 0
    for _ in range(args.trials):
        sites = [synthetic_confusion(args.per_site, args.labels, args.accuracy, rng) for _ in range(args.sites)]
        truth = metrics(EvalCounts(0.0, np.sum(sites, axis=0)))
        noisy = np.sum([release(classification_counts(site), plan) for site in sites], axis=0)
        scores = decode(noisy.tolist(), args.sites, plan, model_round=0)
        withheld += scores.scores["macro_f1"] is None
        for name, values in gaps.items():
            if (estimate := scores.scores[name]) is not None:
                values.append(abs(estimate - truth[name]))
                low, high = scores.intervals[name]
                covered[name] += low <= truth[name] <= high
    shown = {name: f"{statistics.mean(values):.3f} ({covered[name]}/{len(values)})" if values else "withheld"
             for name, values in gaps.items()}
    return (f"| {args.labels} labels, {args.sites} sites × {args.per_site} eval, {args.evaluations} evaluations, "
            f"ε = {args.eval_epsilon:g} (σ = {plan.sigma:.1f} per site"
            f"{f', shared by {args.honest_sites} honest' if args.honest_sites > 1 else ''}) | {shown['accuracy']} "
            f"| {shown['macro_f1']}"
            f"{f' (withheld in {withheld}/{args.trials})' if 0 < withheld < args.trials else ''} |")


def run_rows(out: Path) -> list[str]:
    lines = read_metrics(out)
    server = {line.round: line.server for line in lines}
    latest: dict[tuple[int, Path], dict] = {}  # a resumed run scores a model again: its latest line per site
    for path in sorted((out / "sites").glob("*/site-eval.jsonl")):
        for text in path.read_text().splitlines():
            entry = json.loads(text)
            latest[entry["model_round"], path] = entry
    exact: dict[int, list[dict]] = {}
    for (model_round, _), entry in latest.items():
        exact.setdefault(model_round, []).append(entry)
    rows = ["| model of round | federated accuracy [95 %] | sites' exact | coordinator's test | federated macro-F1 "
            "| coordinator's test macro-F1 |", "|---|---|---|---|---|---|"]
    gaps, test_gaps, hits = [], [], 0
    for line in lines:
        if (federated := line.federated_evaluation) is None or federated.scores.get("accuracy") is None:
            continue
        model_round, estimate = federated.model_round, federated.scores["accuracy"]
        low, high = federated.intervals["accuracy"]
        entries = exact.get(model_round, [])
        pooled = sum(e["accuracy"] * e["examples"] for e in entries) / sum(e["examples"] for e in entries)
        test = server.get(model_round, {})
        gaps.append(abs(estimate - pooled))
        hits += low <= pooled <= high
        if "accuracy" in test:
            test_gaps.append(abs(estimate - test["accuracy"]))
        macro = federated.scores.get("macro_f1")
        rows.append(f"| {model_round} | {estimate:.3f} [{low:.3f}, {high:.3f}] | {pooled:.3f} | "
                    f"{test.get('accuracy', float('nan')):.3f} | {'withheld' if macro is None else f'{macro:.3f}'} | "
                    f"{test.get('macro_f1', float('nan')):.3f} |")
    rows.append(f"\nmean gap to the sites' exact accuracy {statistics.mean(gaps):.3f} (interval covered it in "
                f"{hits}/{len(gaps)}); to the coordinator's test accuracy "
                f"{statistics.mean(test_gaps) if test_gaps else float('nan'):.3f}; noise σ = "
                f"{lines[-1].federated_evaluation.noise_sigma if lines[-1].federated_evaluation else float('nan'):.1f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    noise = sub.add_parser("noise", help="synthetic counts, the real sampler and decoder")
    noise.add_argument("--labels", type=int, default=77)
    noise.add_argument("--sites", type=int, default=5)
    noise.add_argument("--per-site", type=int, default=400, help="evaluation examples per site")
    noise.add_argument("--evaluations", type=int, default=20)
    noise.add_argument("--eval-epsilon", type=float, default=1.0)
    noise.add_argument("--accuracy", type=float, default=0.8)
    noise.add_argument("--trials", type=int, default=30)
    noise.add_argument("--seed", type=int, default=0)
    noise.add_argument("--honest-sites", type=int, default=1,
                       help="distributed DP: each site adds 1/H of the noise (1: all of it, local mode)")
    run = sub.add_parser("run", help="a finished `fedtune simulate` run")
    run.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    print(noise_row(args) if args.mode == "noise" else "\n".join(run_rows(args.out)))


if __name__ == "__main__":
    main()
