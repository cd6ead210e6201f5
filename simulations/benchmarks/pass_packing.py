"""How much a DP-SGD step's passes cost with each packing of its units, side by side.

    python -m simulations.benchmarks.pass_packing [--per-site 400] [--sites 5] [--repeats 2]

One Poisson sample (q = 0.25, OS entropy) of each site's BANKING77 queries (the ``dp-federation`` split, MiniLM +
FFA-LoRA, max length 64), and 500 units of the pooled queries, each run through the per-unit clipped passes
(client.per_unit_grads) packed two ways, alternately: by the token budget alone (PASS_WIDTH_RATIO off: a pass is
filled whatever its rows' lengths) and as client.train packs them (a unit whose longest row is at most half a
pass's width starts a new pass). One torch thread, so that a busy neighbour's cores do not turn small passes'
thread barriers into the measurement. Reports padded tokens, passes and seconds, and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import client.train as train_module
from client.per_unit_grads import PerUnitClipping
from client.plan import TrainingPlan
from common.config import LoraSettings, TrainSettings
from common.encoding import EncodedData
from simulations.benchmarks.dp_federation import Setup, concat, initial_model, site_data

SAMPLE_RATE = 0.25
POOLED_BATCH = 500
UNPACKED = 10 ** 9
"""A width ratio no row reaches: passes filled by the token budget alone (the packing before)."""


def timed_passes(clipping: PerUnitClipping, model: torch.nn.Module, data: EncodedData, units: list[int],
                 ratio: int) -> tuple[float, int, int]:
    """(seconds, passes, padded tokens) of the clipped passes over ``units`` packed with width ratio ``ratio``."""
    train_module.PASS_WIDTH_RATIO = ratio
    plan = TrainingPlan(batch_size=1, units=data.unit_count, steps=1, learning_rate=0.0, max_grad_norm=1.0)
    chunks = train_module.UnitBatches(data, plan, TrainSettings(), poisson=True).chunks(units)
    started = time.perf_counter()
    for _ in clipping.each_pass(chunks, lambda chunk: train_module.forward_loss(model, chunk)):
        pass
    return time.perf_counter() - started, len(chunks), sum(chunk.input_ids.numel() for chunk in chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-site", type=int, default=400)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sites, _, labels = site_data(Setup(sites=args.sites, per_site=args.per_site))
    model = initial_model("", labels, LoraSettings(head_init="label-names"))
    model.train()
    clipping = PerUnitClipping(model, max_grad_norm=1.0)
    draw = np.random.default_rng()  # which units: any sample will do, the two packings see the same one
    pooled = concat(sites)
    batches = [(f"site {i}", data, sorted(np.flatnonzero(draw.random(data.unit_count) < SAMPLE_RATE).tolist()))
               for i, data in enumerate(sites)]
    batches.append(("pooled", pooled, sorted(draw.choice(pooled.unit_count, POOLED_BATCH, replace=False).tolist())))
    before = train_module.PASS_WIDTH_RATIO
    print("| batch | units | passes (before → now) | padded tokens (before → now) | seconds (before → now) | faster |")
    print("|---|---|---|---|---|---|")
    totals = {"sites": [0.0, 0.0], "pooled": [0.0, 0.0]}
    try:
        for name, data, units in batches:
            runs: dict[int, list[tuple[float, int, int]]] = {UNPACKED: [], before: []}
            for _ in range(args.repeats):
                for ratio in (UNPACKED, before):
                    runs[ratio].append(timed_passes(clipping, model, data, units, ratio))
            old, new = (statistics.median(r[0] for r in runs[ratio]) for ratio in (UNPACKED, before))
            (_, old_passes, old_tokens), (_, new_passes, new_tokens) = runs[UNPACKED][0], runs[before][0]
            key = "pooled" if name == "pooled" else "sites"
            totals[key][0] += old
            totals[key][1] += new
            print(f"| {name} | {len(units)} | {old_passes} → {new_passes} | {old_tokens:,} → {new_tokens:,} | "
                  f"{old:.2f} → {new:.2f} | {old / new:.2f}× |", flush=True)
    finally:
        train_module.PASS_WIDTH_RATIO = before
    (site_old, site_new), (pool_old, pool_new) = totals["sites"], totals["pooled"]
    print(f"\nA distributed round's passes (the {args.sites} sites): {site_old:.1f} s → {site_new:.1f} s "
          f"({site_old / site_new:.2f}× faster); against the pooled batch's: {site_old / pool_old:.2f}× before, "
          f"{site_new / pool_new:.2f}× now")


if __name__ == "__main__":
    main()
