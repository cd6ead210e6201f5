"""Federated instruction tuning of the packaged SmolLM2-135M-Instruct, DP on and off (``llm-federation``).

    python -m simulations.benchmarks.llm_federation --data banking77|drugreview --out runs/llm-federation [--rounds 3]

``banking77``: three banks hold customer queries of BANKING77's 6 most frequent intents (Dirichlet
α = 0.5 by intent, as in the demo), asked as instructions: 'A bank customer wrote: "..." Which
intent is it? One of: ... Answer with the intent only.' → the intent. ``drugreview``: three
hospitals hold the packaged drug reviews (split by condition): "... Is this drug review positive,
neutral or negative? Answer with one word." → the rating. Each run goes through ``fedtune
simulate`` (Flower's engine, secure aggregation), DP at ε = 8 per record or off. Prints a Markdown
table of the server's exact match and ROUGE-L before (round 0) and after, against always giving
the most common answer, with the wall time; appends the raw results to ``--results`` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from common.data import read_records, write_records
from fedtune.cli import build_parser, simulate_once
from simulations.benchmarks.benchmark import BANKING77
from simulations.demo import prepare_bank_data


def bank_instructions(folder: Path, out: Path, intents: int = 6) -> list[str]:
    """--data/--test-data flags for BANKING77's most frequent intents as instructions (test rows shuffled,
    seeded, so that the first N the server scores are a sample of every intent)."""
    train, test, _ = prepare_bank_data(folder, out / "bank", intents)
    names = sorted({row["label"] for row in read_records(train)})
    question = f"Which intent is it? One of: {', '.join(names)}. Answer with the intent only."

    def ask(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{"prompt": f'A bank customer wrote: "{row["text"]}"\n{question}', "response": row["label"]}
                for row in rows]

    test_rows = ask(read_records(test))
    random.Random(0).shuffle(test_rows)
    return ["--data", str(write_records(out / "bank" / "train-chat.csv", ask(read_records(train)))),
            "--test-data", str(write_records(out / "bank" / "test-chat.csv", test_rows)), "--partition", "dirichlet"]


def run(out: Path, data: list[str], *, dp: bool, rounds: int, test_examples: int, epochs: int) -> dict:
    flags = ["simulate", "--out", str(out), "--task", "causal-lm", "--model", "smollm2", *data,
             "--sites", "3", "--rounds", str(rounds), "--local-epochs",
             str(epochs), "--batch-size", "32", "--max-length", "128", "--test-examples", str(test_examples)]
    args = build_parser()[0].parse_args(flags + ([] if dp else ["--no-dp"]))
    started = time.perf_counter()
    summary = simulate_once(args, out, dp=dp, title=f"SmolLM2 instruction tuning, DP {'on' if dp else 'off'}")
    return {"dp": dp, "rounds": rounds, "epochs_per_round": epochs, "test_examples": test_examples,
            "seconds": round(time.perf_counter() - started, 1), "floor": summary.run.majority_baseline,
            "curve": [{k: line.server[k] for k in ("exact_match", "rouge_l", "loss", "perplexity")}
                      for line in summary.rounds],
            "epsilon": summary.epsilon, "samples": summary.final.get("samples", [])}


def table(results: list[dict]) -> str:
    floor = results[0]["floor"]
    rows = [f"| SmolLM2-135M-Instruct, 3 sites, {results[0]['data']} | exact match | ROUGE-L | answer perplexity "
            "| wall time |",
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
    parser.add_argument("--data", choices=("banking77", "drugreview"), default="banking77")
    parser.add_argument("--banking77", type=Path, default=BANKING77, help="the BANKING77 folder (CC BY 4.0)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--test-examples", type=int, default=120)
    parser.add_argument("--results", type=Path, default=None, help="append the raw results here (JSON lines)")
    args = parser.parse_args()
    data = (bank_instructions(args.banking77, args.out) if args.data == "banking77"
            else ["--data", "drugreview", "--partition", "column:condition"])
    results = [run(args.out / ("dp-on" if dp else "dp-off"), data, dp=dp, rounds=args.rounds,
                   test_examples=args.test_examples, epochs=args.epochs) | {"data": args.data} for dp in (False, True)]
    if args.results:
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in results)
    print("\n" + table(results))


if __name__ == "__main__":
    main()
