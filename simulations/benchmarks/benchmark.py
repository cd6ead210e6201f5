"""Benchmarks: every number is a ratio or a size measured side by side in one run (shared, noisy machines).
Run as `python -m simulations.benchmarks.NAME`:

    benchmark dp-throughput  DP-SGD vs plain LoRA steps, fedtune vs Opacus (MiniLM, SmolLM2)
    benchmark secagg         server unmasking time at 10/100/1,000 sites; upload bytes
    benchmark group-exp      a whole secure round: GMP's constant-time exponentiation vs Python's pow
    benchmark round-time     a 10-site round, secure vs plain aggregation (Flower simulation)
    benchmark simulation-actors   a 10-site simulated round, 2 cores per site vs 1
    benchmark dp-utility     macro-F1 under DP as records per site grow (BANKING77)
    benchmark padding        padding per chunk vs to the site's longest record (BANKING77)
    deployed_round           a deployed round's overhead, fedtune's site runtime vs Flower's
    privacy_audit            the one-run privacy audit of the site's DP-SGD step: claimed ε 1, 3, 8, noise off
    dp_federation ...        federated DP vs pooled data and sites alone (BANKING77; hours on 2 cores,
                             so not part of `make bench`)

Each prints a Markdown table; BENCHMARKS.md holds the results and the machine they came from.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.adapter import get_adapter_state, trainable_keys
from common.config import LoraSettings, PrivacySettings, TrainSettings
from common.data import label_names, read_records, write_records
from common.encoding import encode
from common.model import build_model, load_tokenizer, resolve_model_path
from common.run_files import MetricsLine, read_metrics, read_run_info

BANKING77 = Path(__file__).resolve().parents[3] / "shared" / "data" / "banking77"


def _steps_per_second(model_name: str, task: str, engine: str, chunks: list, rows: int) -> float:
    """Samples per second of DP-SGD (or plain) steps over the same logical batches, one engine."""
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer

    from client.per_unit_grads import PerUnitDPSGD
    from client.train import forward_loss

    model = build_model(model_name, 3 if task == "classification" else 0, LoraSettings(), task)  # type: ignore[arg-type]
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    started = time.perf_counter()
    if engine == "plain":
        for batch in chunks:
            for chunk in batch:
                (forward_loss(model, chunk) * (len(chunk.labels) / rows)).backward()
            optimizer.step()
            optimizer.zero_grad()
    elif engine == "fedtune":
        dp_sgd = PerUnitDPSGD(model, optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=rows,
                              generator=torch.Generator())
        for batch in chunks:
            dp_sgd.step(batch, lambda chunk: forward_loss(model, chunk))
    else:  # Opacus 1.6 hooks and DPOptimizer, the reference
        private = prepare_module(model, grad_sample_mode="hooks", batch_first=True, loss_reduction="mean")
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=rows)
        for batch in chunks:
            for i, chunk in enumerate(batch):
                dp_optimizer.signal_skip_step(do_skip=i < len(batch) - 1)
                forward_loss(private, chunk).backward()
                dp_optimizer.step()
                if i < len(batch) - 1:
                    dp_optimizer.zero_grad()
            dp_optimizer.zero_grad()
        private._close()
    return rows * len(chunks) / (time.perf_counter() - started)


def dp_throughput(repeats: int = 2) -> None:
    """DP-SGD vs plain LoRA steps, fedtune's per-unit gradients vs Opacus' hooks, on the same batches."""
    from client.plan import TrainingPlan
    from client.train import UnitBatches

    rows, physical, length = 32, 16, 128
    print(f"| model (LoRA r=8 FFA, {length} tokens, batch {rows} in passes of {physical}, "
          f"{torch.get_num_threads()} threads) | no DP (samples/s) | Opacus hooks | fedtune | Opacus / no DP "
          f"| **fedtune / no DP** | fedtune / Opacus |\n|---|---|---|---|---|---|---|")
    for model_name, task, steps in (("minilm", "classification", 8), ("smollm2", "causal-lm", 3)):
        records = read_records("drugreview", task=task)[:rows * steps]  # type: ignore[arg-type]
        labels = label_names(records) if task == "classification" else ()
        data = encode(records, labels, load_tokenizer(model_name), length, "bench", task=task)  # type: ignore[arg-type]
        plan = TrainingPlan(batch_size=rows, units=len(data), steps=steps, learning_rate=1e-3, max_grad_norm=1.0)
        chunks = list(UnitBatches(data, plan, TrainSettings(physical_batch_tokens=physical * length), poisson=False))
        speed: dict[str, list[float]] = {"plain": [], "opacus": [], "fedtune": []}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits every engine alike
            for engine in speed:
                speed[engine].append(_steps_per_second(model_name, task, engine, chunks, rows))
        plain, opacus, ours = (statistics.median(speed[k]) for k in ("plain", "opacus", "fedtune"))
        print(f"| {model_name} ({task}) | {plain:.1f} | {opacus:.1f} | {ours:.1f} | {opacus / plain:.2f} "
              f"| **{ours / plain:.2f}** | {ours / opacus:.2f} |", flush=True)
    model = build_model("", 3, LoraSettings())
    state = get_adapter_state(model)
    ffa = sum(state[k].size for k in trainable_keys(state, "ffa")) * 4
    full = sum(v.size for v in state.values()) * 4
    model_bytes = sum(p.stat().st_size for p in resolve_model_path("").glob("*.safetensors"))
    print("\n| what (MiniLM, 3 labels) | bytes | vs full model |\n|---|---|---|")
    print(f"| FFA update (lora_B + head, fp32) sent per round | {ffa:,} | {ffa / model_bytes:.4%} |")
    print(f"| whole adapter (A + B + head, fp32) | {full:,} | {full / model_bytes:.4%} |")
    print(f"| base model safetensors | {model_bytes:,} | 100% |")


def secagg(sizes: tuple[int, ...] = (10, 100, 1000), length: int = 74_883) -> None:
    from common.secagg import LocalFederation, SecAggParams
    from common.secure_update import ALL_PAIRS_UP_TO, COUNT_SLOTS, value_bits_for

    print("| sites | neighbours k | threshold t | modulus bits | upload / fp32 bytes | server: check uploads (s) "
          "| server: verify shares, unmask, sum (s) | one site: mask+pack (s) |\n|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in sizes:
        params = SecAggParams(round_id=f"bench-{n}".encode(), site_ids=tuple(range(n)), vector_length=length, clip=50.0,
                              value_bits=value_bits_for(n), count_slots=COUNT_SLOTS, all_pairs=n <= ALL_PAIRS_UP_TO)
        fed = LocalFederation.create(params)
        routed = fed.advertise()
        inboxes = fed.share(routed)
        update = rng.normal(scale=0.01, size=length)
        counts = [1] * params.count_slots
        started = time.perf_counter()
        uploads = fed.masked_uploads(inboxes, dict.fromkeys(params.site_ids, update),
                                     dict.fromkeys(params.site_ids, counts))
        per_site = (time.perf_counter() - started) / n
        started = time.perf_counter()
        survivors = fed.server.collect_masked(uploads)
        summed = time.perf_counter() - started
        request = fed.confirm(survivors)
        responses = fed.unmask_responses(request)
        started = time.perf_counter()
        result = fed.server.finish(responses)
        unmask = time.perf_counter() - started
        assert np.allclose(result.sum_vector, n * update, atol=result.error_bound + 1e-9)
        assert max(len(u) for u in uploads.values()) <= 1.1 * 4 * length
        ratio = params.packed_bytes / (4 * length)
        print(f"| {n:,} | {params.degree} | {params.threshold} | {params.modulus_bits} | {ratio:.3f} | "
              f"{summed:.3f} | {unmask:.3f} | {per_site:.3f} |")


def group_exponentiation(sizes: tuple[int, ...] = (10, 40), length: int = 1_000, repeats: int = 2) -> None:
    """A whole secure round in one process (commitments, share checks, masks, unmask) with the group's
    exponentiation in GMP's constant-time powmod (as shipped) against Python's pow, interleaved."""
    import types

    import gmpy2

    from common.secagg import LocalFederation, SecAggParams, group
    from common.secure_update import ALL_PAIRS_UP_TO, COUNT_SLOTS, value_bits_for

    engines = {"gmpy2.powmod_sec": gmpy2, "Python pow": types.SimpleNamespace(powmod_sec=pow)}
    print("| sites | Python pow (s) | gmpy2.powmod_sec (s) | ratio |\n|---|---|---|---|")
    for n in sizes:
        params = SecAggParams(round_id=f"group-{n}".encode(), site_ids=tuple(range(n)), vector_length=length,
                              clip=50.0, value_bits=value_bits_for(n), count_slots=COUNT_SLOTS,
                              all_pairs=n <= ALL_PAIRS_UP_TO)
        update = np.full(length, 0.01)
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(repeats):
            for name, engine in engines.items():
                group.gmpy2 = engine
                try:
                    started = time.perf_counter()
                    LocalFederation.create(params).run(dict.fromkeys(params.site_ids, update))
                    times[name].append(time.perf_counter() - started)
                finally:
                    group.gmpy2 = gmpy2
        slow, fast = min(times["Python pow"]), min(times["gmpy2.powmod_sec"])
        print(f"| {n} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}× |")


def _simulated_rounds(root: Path, name: str, sites: int, extra: list[str]) -> list[MetricsLine]:
    """The metrics lines of a 3-round simulation of ``sites`` sites (20 reviews each), after its first round
    (which starts the Ray actors)."""
    from fedtune.cli import main as fedtune

    records = read_records("drugreview")
    if not (root / "train.csv").exists():
        write_records(root / "train.csv", records[: 20 * sites])
        write_records(root / "test.csv", records[500:540])
    out = root / name
    args = ["simulate", "--out", str(out), "--sites", str(sites), "--rounds", "3", "--data", str(root / "train.csv"),
            "--test-data", str(root / "test.csv"), "--partition", "iid", "--max-length", "32", "--local-epochs", "1",
            "--batch-size", "10", "--epsilon", "50", *extra]
    if fedtune(args) != 0:
        sys.exit(f"the simulation {name} failed")
    return read_metrics(out)[2:]


def round_time(sites: int = 10, repeats: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        durations: dict[str, list[float]] = {"plain": [], "secure": []}
        upload_bytes = 0
        for attempt in range(repeats):
            for mode in ("plain", "secure"):
                lines = _simulated_rounds(root, f"{mode}-{attempt}", sites,
                                          ["--plain-aggregation"] if mode == "plain" else [])
                durations[mode] += [line.duration_s for line in lines]
                if mode == "secure" and (details := lines[-1].secure_aggregation) is not None:
                    upload_bytes = details.upload_bytes
        values = read_run_info(root / "secure-0").update_values
    plain, secure = statistics.median(durations["plain"]), statistics.median(durations["secure"])
    print(f"| {sites} sites, MiniLM FFA adapter ({values:,} values) | round time (s, median of "
          f"{len(durations['plain'])} warm rounds) |\n|---|---|")
    print(f"| plain aggregation | {plain:.1f} |\n| secure aggregation | {secure:.1f} |")
    print(f"| **secure / plain** | **{secure / plain:.2f}** |")
    print(f"| upload per site / fp32 update bytes | {upload_bytes / (4 * values):.3f} |")


def simulation_actors(sites: int = 10, repeats: int = 2) -> None:
    """A simulated secure round with each site's actor reserving 2 cores (before) or 1 (now), interleaved."""
    with tempfile.TemporaryDirectory() as tmp:
        durations: dict[int, list[float]] = {2: [], 1: []}
        for attempt in range(repeats):
            for cpus in durations:
                lines = _simulated_rounds(Path(tmp), f"cpus{cpus}-{attempt}", sites, ["--cpus-per-site", str(cpus)])
                durations[cpus] += [line.duration_s for line in lines]
    before, after = statistics.median(durations[2]), statistics.median(durations[1])
    print(f"| {sites} sites, secure aggregation, {os.cpu_count()} cores | round time (s, median of "
          f"{len(durations[1])} warm rounds) |\n|---|---|")
    print(f"| 2 cores per site (before) | {before:.1f} |\n| 1 core per site (now) | {after:.1f} |")
    print(f"| **before / now** | **{before / after:.2f}** |")


def dp_utility(sizes: tuple[int, ...] = (250, 1000, 4000), epochs: int = 5) -> None:
    """One site's records → macro-F1 on the BANKING77 test set, DP (ε=8) vs no DP, FFA-LoRA."""
    from client.privacy import PrivacyLedger
    from client.train import train_locally
    from common.evaluation import evaluate, metrics

    if not (BANKING77 / "train.csv").is_file():
        sys.exit(f"BANKING77 not found at {BANKING77}")
    train_all = [{"text": r["text"], "label": r["category"]} for r in _rows(BANKING77 / "train.csv")]
    test = [{"text": r["text"], "label": r["category"]} for r in _rows(BANKING77 / "test.csv")]
    labels = label_names(train_all)
    tokenizer = load_tokenizer("")
    test_data = encode(test, labels, tokenizer, 48, "test")
    order = np.random.default_rng(0).permutation(len(train_all))
    print(f"| records at the site ({epochs} epochs, batch n/4, lr 2e-2, FFA r=8) | no DP macro-F1 | DP ε=8 macro-F1 "
          "| DP / no DP |\n|---|---|---|---|")
    for n in sizes:
        data = encode([train_all[i] for i in order[:n]], labels, tokenizer, 48, "train")
        scores = {}
        for dp in (False, True):
            settings = TrainSettings(learning_rate=0.02, local_epochs=epochs, batch_size=max(32, n // 4),
                                     physical_batch_tokens=64 * 48)
            model = build_model("", len(labels), LoraSettings())
            with tempfile.TemporaryDirectory() as tmp:
                ledger = PrivacyLedger(Path(tmp) / "l.json", PrivacySettings(epsilon=8.0)) if dp else None
                train_locally(model, data, settings, ledger=ledger, planned_rounds=1, server_round=1, run_id=0)
            scores[dp] = metrics(evaluate(model, test_data, len(labels)))["macro_f1"]
        print(f"| {n:,} | {scores[False]:.3f} | {scores[True]:.3f} | {scores[True] / max(scores[False], 1e-9):.2f} |",
              flush=True)


def padding(records: int = 1000, repeats: int = 2) -> None:
    """One DP round on BANKING77 rows: chunks sorted by length and trimmed (ours) vs padded to the site's longest."""
    from client import train
    from client.privacy import PrivacyLedger

    class PaddedToLongest(train.UnitBatches):
        """Record units in drawn order, chunks of the token budget's rows at the site's full padded width."""

        def chunks(self, units):
            rows = np.array([self.rows[u][0] for u in units], dtype=np.int64)
            ids, mask, labels = self.data.dataset.tensors
            physical = max(1, self.tokens // ids.shape[1])
            parts = [torch.from_numpy(rows[i:i + physical]) for i in range(0, len(rows), physical)]
            return [train.Chunk(ids[p], mask[p], labels[p], torch.arange(len(p)), len(p)) for p in parts]

    rows = [{"text": r["text"], "label": r["category"]} for r in _rows(BANKING77 / "train.csv")]
    chosen = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[:records]]
    data = encode(chosen, label_names(rows), load_tokenizer(""), 64, "bench")
    lengths = data.dataset.tensors[1].sum(1).float()
    timings: dict[str, list[float]] = {"ours": [], "longest": []}
    for _ in range(repeats):
        for name, batches in (("ours", train.UnitBatches), ("longest", PaddedToLongest)):
            original, train.UnitBatches = train.UnitBatches, batches  # type: ignore[misc]
            try:
                model = build_model("", 77, LoraSettings())
                with tempfile.TemporaryDirectory() as tmp:
                    ledger = PrivacyLedger(Path(tmp) / "l.json", PrivacySettings())
                    started = time.perf_counter()
                    result = train.train_locally(model, data, TrainSettings(), ledger=ledger, planned_rounds=10,
                                                 server_round=1, run_id=0)
                    timings[name].append(result.steps * records / 4 / (time.perf_counter() - started))
            finally:
                train.UnitBatches = original  # type: ignore[misc]
    ours, longest = statistics.median(timings["ours"]), statistics.median(timings["longest"])
    print(f"| one DP round, {records:,} BANKING77 queries (mean {lengths.mean():.0f} tokens, longest "
          f"{int(lengths.max())}), chunks of 32 | samples/s |\n|---|---|")
    print(f"| padded to the site's longest record | {longest:.1f} |\n| sorted by length, each chunk trimmed to its "
          f"own longest (fedtune) | {ours:.1f} |\n| **speed-up** | **{ours / longest:.2f}×** |")


def _rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", default=["dp-throughput", "secagg", "group-exp", "round-time",
                                                      "simulation-actors", "dp-utility", "padding"])
    for which in parser.parse_args().which:
        print(f"\n### {which}\n", flush=True)
        runs: dict[str, Callable[[], None]] = {
            "dp-throughput": dp_throughput, "secagg": secagg, "round-time": round_time, "dp-utility": dp_utility,
            "padding": padding, "simulation-actors": simulation_actors, "group-exp": group_exponentiation}
        runs[which]()


if __name__ == "__main__":
    main()
