"""Federated instruction tuning of the packaged SmolLM2-135M-Instruct, DP on and off (``llm-federation``).

    python -m simulations.llm_federation --out runs/llm-federation [--rounds 3] [--test-examples 120]

Three hospitals hold the packaged drug reviews (split by the patient's condition, so each has its own
mix), asked as instructions: "Drug review: ... Is this drug review positive, neutral or negative?
Answer with one word." → the rating. Each run goes through ``fedtune simulate`` (Flower's engine,
secure aggregation), DP at ε = 8 per record or off. Prints a Markdown table of the server's exact
match and ROUGE-L before (round 0) and after, against always giving the most common answer, with
the wall time; appends the raw results to ``--results`` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedtune.cli import build_parser, simulate_once


def run(out: Path, *, dp: bool, rounds: int, test_examples: int, epochs: int) -> dict:
    flags = ["simulate", "--out", str(out), "--task", "causal-lm", "--model", "smollm2", "--data", "drugreview",
             "--partition", "column:condition", "--sites", "3", "--rounds", str(rounds), "--local-epochs",
             str(epochs), "--batch-size", "32", "--max-length", "128", "--test-examples", str(test_examples)]
    args = build_parser()[0].parse_args(flags + ([] if dp else ["--no-dp"]))
    started = time.perf_counter()
    summary = simulate_once(args, out, dp=dp, title=f"SmolLM2 instruction tuning, DP {'on' if dp else 'off'}")
    return {"dp": dp, "rounds": rounds, "epochs_per_round": epochs, "test_examples": test_examples,
            "seconds": round(time.perf_counter() - started, 1), "floor": summary["majority"],
            "curve": [{k: line["server"][k] for k in ("exact_match", "rouge_l", "loss", "perplexity")}
                      for line in summary["rounds"]],
            "epsilon": summary["epsilon"], "samples": summary["final"].get("samples", [])}


def table(results: list[dict]) -> str:
    floor = results[0]["floor"]
    rows = ["| SmolLM2-135M-Instruct, 3 sites | exact match | ROUGE-L | answer perplexity | wall time |",
            "|---|---|---|---|---|",
            f"| most common answer (floor) | {floor['exact_match']:.3f} | {floor['rouge_l']:.3f} | - | - |"]
    before = results[0]["curve"][0]
    rows.append(f"| before fine-tuning (round 0) | {before['exact_match']:.3f} | {before['rouge_l']:.3f} "
                f"| {before['perplexity']:.1f} | - |")
    for r in results:
        after = r["curve"][-1]
        privacy = "DP ε = 8 per record" if r["dp"] else "no DP"
        rows.append(f"| federated, {privacy}, after {r['rounds']} rounds | **{after['exact_match']:.3f}** "
                    f"| {after['rouge_l']:.3f} | {after['perplexity']:.2f} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/llm-federation"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--test-examples", type=int, default=120)
    parser.add_argument("--results", type=Path, default=None, help="append the raw results here (JSON lines)")
    args = parser.parse_args()
    results = [run(args.out / ("dp-on" if dp else "dp-off"), dp=dp, rounds=args.rounds,
                   test_examples=args.test_examples, epochs=args.epochs) for dp in (False, True)]
    if args.results:
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in results)
    print("\n" + table(results))


if __name__ == "__main__":
    main()
