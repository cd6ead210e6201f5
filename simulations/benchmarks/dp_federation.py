"""``dp-federation``: does federated DP learn nearly as well as pooling the data without DP?

BANKING77 (77 intents; ../shared/data/banking77, not shipped) split into sites (Dirichlet α=0.5 by
label, or IID), the 3,080-row test split, MiniLM + FFA-LoRA, the automatic training plan. Each row
trains with the sites' own code (client.train.train_locally: Poisson sampling, per-unit clipping,
noise from OS entropy, the ε ledger) and the server's own step (server.optimizer), federated
in this one process with equal weights, as the ServerApp averages (secure aggregation adds only
fixed-point rounding, bounded and negligible: tests/test_simulation_e2e.py). Rows:

    central        all sites' records pooled, no DP: the reference
    fed            the federation, no DP
    fed-dp         the federation, DP (ε per unit, each site's own budget)
    local-dp       each site alone with the same DP budget (mean over sites)
    central-dp     all records pooled at one site, DP
    fed-dp-distributed  the federation, one DP-SGD step of the pooled data per round (rounds = steps): each site
                   uploads its sampled units' encoded clipped gradients with its share of Skellam noise
                   (common/distributed_dp.py), the server decodes the sum and steps

    python -m simulations.benchmarks.dp_federation --rows central,fed,fed-dp,local-dp,central-dp --results r.jsonl

Each row appends a JSON line to --results; the table (and a plot with --plot) is printed from all of them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from client.distributed_step import distributed_contribution
from client.plan import AUTO_LEARNING_RATE, plan_training
from client.privacy import PrivacyLedger
from client.train import train_locally
from common.adapter import apply_delta, delta, flatten, get_adapter_state, set_adapter_state, trainable_keys
from common.config import (
    HeadInit,
    LoraSettings,
    PrivacySettings,
    ServerOptimizerName,
    ServerSettings,
    TrainSettings,
    unit_column,
)
from common.data import label_names, partition
from common.distributed_dp import DistributedDpPlan, DistributedDpSettings, plan_distributed_dp, rotation_seed
from common.encoding import EncodedData, encode
from common.evaluation import evaluate, metrics
from common.model import initial_model, load_tokenizer, resolve_model_path, sentence_pooling
from common.typed import from_mapping, kebab
from server.distributed_step import distributed_update
from server.optimizer import ServerOptimizer
from server.strategy import weighted_mean

BANKING77 = Path(__file__).resolve().parents[3] / "shared" / "data" / "banking77"
ROWS = ("central", "fed", "fed-dp", "local-dp", "central-dp", "fed-dp-distributed")
SITE_OPTIMIZERS = ("fresh", "kept")


@dataclasses.dataclass(frozen=True)
class Setup:
    sites: int = 5
    per_site: int = 2000
    partition: str = "dirichlet"
    rounds: int = 10
    epsilon: float = 8.0
    delta: float = 1e-5
    unit: str = "record"
    epochs: int = 0
    """Epochs per round; 0 = the automatic plan (30 over the run)."""
    batch_size: int = 0
    """Expected units per step of the local-noise rows (train.batch-size); 0 = the automatic plan (a quarter)."""
    server: ServerOptimizerName = "fedavg"
    server_lr: float = 1.0
    max_length: int = 64
    seed: int = 0
    intents: int = 77
    """Keep only the most frequent intents (77 = all)."""
    site_optimizer: str = "fresh"
    """'kept': each site continues its AdamW state across rounds; 'fresh': a new AdamW every round."""
    head_init: HeadInit = "label-names"
    """The classifier head's start (lora.head-init); rows measured before it existed started 'random'."""
    min_honest_sites: int = 0
    """fed-dp-distributed: the fewest sites assumed honest (their noise shares reach ε); 0 = every site."""
    sample_rate: float = 0.0
    """fed-dp-distributed: q; 0 = the automatic plan's q for the pooled records (as central-dp)."""
    step_optimizer: ServerOptimizerName = "adam"
    """fed-dp-distributed: the server's optimizer on the noisy mean gradient (adam: the sites' bias-corrected Adam)."""
    step_lr: float = AUTO_LEARNING_RATE
    eval_every: int = 0
    """fed-dp-distributed: evaluate every this many rounds (and the last); 0 = about 10 evaluations."""

    def __post_init__(self) -> None:
        if self.site_optimizer not in SITE_OPTIMIZERS:
            raise ValueError(f"--site-optimizer must be one of {', '.join(SITE_OPTIMIZERS)}, "
                             f"got {self.site_optimizer!r}")
        LoraSettings(head_init=self.head_init)  # refuses an unknown start by name


def banking77(split: str) -> list[dict[str, str]]:
    with open(BANKING77 / f"{split}.csv", encoding="utf-8") as handle:
        return [{"text": row["text"], "label": row["category"]} for row in csv.DictReader(handle)]


def with_customers(records: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """Group rows into synthetic customers of 1-5 rows each (seeded): a per-person unit to protect."""
    rng = np.random.default_rng(seed)
    order, out, customer = rng.permutation(len(records)), [dict(r) for r in records], 0
    start = 0
    while start < len(order):
        size = int(rng.integers(1, 6))
        for i in order[start:start + size]:
            out[i]["customer"] = f"c{customer}"
        start, customer = start + size, customer + 1
    return out


def site_data(setup: Setup) -> tuple[list[EncodedData], EncodedData, tuple[str, ...]]:
    train, test = banking77("train"), banking77("test")
    if setup.intents < 77:
        counts = Counter(row["label"] for row in train)
        kept = {label for label, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:setup.intents]}
        train, test = ([row for row in rows if row["label"] in kept] for rows in (train, test))
    labels = label_names(train)
    if setup.unit != "record":
        train = with_customers(train, setup.seed)
    pool = [train[i] for i in np.random.default_rng(setup.seed).permutation(len(train))[: setup.sites * setup.per_site]]
    parts = partition(pool, setup.sites, setup.partition, alpha=0.5, seed=setup.seed)
    tokenizer = load_tokenizer("")
    sites = [encode([pool[i] for i in part], labels, tokenizer, setup.max_length, f"site {n}",
                    unit_column=unit_column(setup.unit)) for n, part in enumerate(parts)]
    return sites, encode(test, labels, tokenizer, setup.max_length, "test"), labels


def run(setup: Setup, row: str) -> dict:
    sites, test, labels = site_data(setup)
    dp = "-dp" in row
    privacy = PrivacySettings(enabled=dp, epsilon=setup.epsilon, delta=setup.delta, unit=setup.unit)
    train = TrainSettings(local_epochs=setup.epochs, batch_size=setup.batch_size)
    lora = LoraSettings(head_init=setup.head_init)
    started, cpu = time.perf_counter(), time.process_time()
    extra: dict = {}
    if row == "fed-dp-distributed":
        curve, extra = federate_distributed(sites, test, labels, setup, privacy, train, lora)
    elif row.startswith("central"):
        pooled = [concat(sites)]
        curve = federate(pooled, test, labels, setup, privacy, train, lora)
    elif row.startswith("local"):
        curves = [federate([site], test, labels, setup, privacy, train, lora) for site in sites]
        curve = [float(np.mean(scores)) for scores in zip(*curves, strict=True)]
    else:
        curve = federate(sites, test, labels, setup, privacy, train, lora)
    read = "mean-pooled" if sentence_pooling(resolve_model_path("")) == "mean" else "[CLS] pooler"
    return {"row": row, "setup": dataclasses.asdict(setup), "features": read, "macro_f1": curve,
            "sizes": [len(s) for s in sites], "units": [s.unit_count for s in sites],
            "wall_s": round(time.perf_counter() - started), "cpu_s": round(time.process_time() - cpu), **extra}


def concat(sites: list[EncodedData]) -> EncodedData:
    width = max(s.dataset.tensors[0].shape[1] for s in sites)
    pad = lambda t: F.pad(t, (0, width - t.shape[1]))  # noqa: E731
    tensors = [torch.cat([pad(s.dataset.tensors[i]) for s in sites]) for i in (0, 1)]
    offsets = np.cumsum([0] + [s.unit_count for s in sites[:-1]])
    return EncodedData(TensorDataset(*tensors, torch.cat([s.dataset.tensors[2] for s in sites])),
                       np.concatenate([s.labels for s in sites]),
                       np.concatenate([s.units + o for s, o in zip(sites, offsets, strict=True)]))


def federate(sites, test, labels, setup: Setup, privacy, train, lora) -> list[float]:
    """FedAvg (or the chosen server optimizer) over ``sites``; the test macro-F1 after every round."""
    model = initial_model("", labels, lora)
    state = get_adapter_state(model)
    keys = trainable_keys(state, lora.aggregation)
    server = ServerOptimizer(ServerSettings(optimizer=setup.server, learning_rate=setup.server_lr),
                             sum(state[k].size for k in keys))
    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = [PrivacyLedger(Path(tmp) / f"site-{i}" / "ledger.json", privacy) if privacy.enabled else None
                   for i in range(len(sites))]
        kept: list[dict | None] = [None] * len(sites)
        for server_round in range(1, setup.rounds + 1):
            updates = []
            for i, (data, ledger) in enumerate(zip(sites, ledgers, strict=True)):
                set_adapter_state(model, state)
                result = train_locally(model, data, train, ledger=ledger, privacy=privacy, planned_rounds=setup.rounds,
                                       server_round=server_round, run_id=0, optimizer_state=kept[i])
                kept[i] = result.optimizer_state if setup.site_optimizer == "kept" else None
                updates.append(delta(result.adapter, state, keys))
            state = apply_delta(state, server.step(weighted_mean(updates, [1] * len(updates))), keys)
            set_adapter_state(model, state)
            curve.append(metrics(evaluate(model, test, len(labels)))["macro_f1"])
            print(f"  round {server_round}: macro-F1 {curve[-1]:.3f}", flush=True)
    return curve


def federate_distributed(sites, test, labels, setup: Setup, privacy, train, lora) -> tuple[list[float], dict]:
    """One DP-SGD step of the pooled records per round: every site's upload (client.distributed_step), their sum
    mod 2^b (what secure aggregation returns), the server's step (server.distributed_step). The macro-F1 every
    ``eval_every`` rounds, and the plan's numbers."""
    model = initial_model("", labels, lora)
    state = get_adapter_state(model)
    keys = trainable_keys(state, lora.aggregation)
    dimension = flatten(state, keys).size
    units = sum(site.unit_count for site in sites)  # the sites' public sizes (declared in this benchmark)
    rate = setup.sample_rate or plan_training(units, train, privacy, setup.rounds).sample_rate
    plan = plan_distributed_dp(DistributedDpSettings(
        dimension=dimension, clip=privacy.max_grad_norm, sample_rate=rate, steps=setup.rounds,
        epsilon=setup.epsilon, delta=setup.delta, sites=len(sites),
        min_honest_sites=setup.min_honest_sites or len(sites), expected_batch=rate * units))
    print(f"  plan: {describe(plan)}", flush=True)
    server = ServerOptimizer(ServerSettings(optimizer=setup.step_optimizer, learning_rate=setup.step_lr), dimension)
    every = setup.eval_every or max(1, setup.rounds // 10)
    curve, evaluated = [], []
    for server_round in range(1, setup.rounds + 1):
        seed = rotation_seed(0, server_round)
        ring_sum = np.zeros(plan.padded_dimension, dtype=np.uint64)
        for data in sites:
            set_adapter_state(model, state)
            upload = distributed_contribution(model, data, plan, keys=keys, seed=seed, settings=train)
            ring_sum = (ring_sum + upload) & np.uint64((1 << plan.ring_bits) - 1)
        state = apply_delta(state, distributed_update(plan, ring_sum, seed=seed, participants=len(sites),
                                                      honest_sites=plan.settings.min_honest_sites,
                                                      optimizer=server), keys)
        if server_round % every == 0 or server_round == setup.rounds:
            set_adapter_state(model, state)
            curve.append(metrics(evaluate(model, test, len(labels)))["macro_f1"])
            evaluated.append(server_round)
            print(f"  round {server_round}: macro-F1 {curve[-1]:.3f}", flush=True)
    return curve, {"evaluated_rounds": evaluated, "distributed": {
        "sample_rate": rate, "expected_batch": plan.settings.expected_batch,
        "honest_sites": plan.settings.min_honest_sites, "noise_multiplier": plan.noise_multiplier,
        "variance": plan.total_variance, "ring_bits": plan.ring_bits,
        "epsilon": plan.epsilon, "local_epsilon": plan.local_epsilon, "upload_vs_fp32": plan.upload_vs_fp32}}


def describe(plan: DistributedDpPlan) -> str:
    s = plan.settings
    return (f"q={s.sample_rate:.4g}, expected batch {s.expected_batch:g}, {s.min_honest_sites} of {s.sites} sites "
            f"honest: σ/Δ₂={plan.noise_multiplier:.3f}, {plan.ring_bits}-bit ring ({plan.upload_vs_fp32:.2f}× fp32), "
            f"ε={plan.epsilon:.3f} against the coordinator, {plan.local_epsilon:.3g} from one site's noise alone")


def server_step(setup: dict, row: str = "") -> str:
    """How a row combined its rounds: the server optimizer, its step when not 1, a site AdamW kept across rounds
    (fed-dp-distributed: the server's optimizer on the noisy mean gradient)."""
    if row == "fed-dp-distributed":
        return f"{setup['step_optimizer']} (η={setup['step_lr']:g}) on the pooled step"
    text = setup["server"] + (f" (η={setup['server_lr']:g})" if setup["server_lr"] != 1.0 else "")
    return text + (", site AdamW kept" if setup.get("site_optimizer", "fresh") == "kept" else "")


def row_name(result: dict) -> str:
    """The row, with a distributed row's trust assumption and the ε one site's noise gives alone."""
    plan = result.get("distributed")
    if not plan:
        return result["row"]
    return (f"{result['row']} ({plan['honest_sites']}/{result['setup']['sites']} honest, ε alone "
            f"{plan['local_epsilon']:.3g}, {plan['ring_bits']}-bit ring = {plan['upload_vs_fp32']:.2f}× fp32)")


def head_init(setup: dict) -> str:
    """The row's starting head; rows measured before lora.head-init existed started at random."""
    return setup.get("head_init", "random")


def features(result: dict) -> str:
    """What the row's head read; rows measured before the mean-pooled sentence embedding read the [CLS] pooler."""
    return result.get("features", "[CLS] pooler")


def reference(result: dict, results: list[dict]) -> tuple[float, bool] | None:
    """The pooled non-DP macro-F1 to compare a row with: the central row of the same intents and features,
    at the same sites × records when measured (True), else at another size (False)."""
    s = result["setup"]
    central = [r for r in results if r["row"] == "central" and features(r) == features(result)
               and r["setup"].get("intents", 77) == s.get("intents", 77)]
    same = [r for r in central if (r["setup"]["sites"], r["setup"]["per_site"]) == (s["sites"], s["per_site"])]
    chosen = (same or central)[-1:]
    return (chosen[0]["macro_f1"][-1], bool(same)) if chosen else None


def table(results: list[dict]) -> str:
    lines = ["| row | sites × records | intents | partition | unit | ε | server | head | features | macro-F1 "
             "| vs central non-DP | rounds | CPU s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, f1 = r["setup"], r["macro_f1"][-1]
        eps = s["epsilon"] if "-dp" in r["row"] else "-"
        pooled = reference(r, results)
        ratio = f"{f1 / pooled[0]:.2f}" + ("" if pooled[1] else "†") if pooled else "-"
        lines.append(f"| {row_name(r)} | {s['sites']} × {s['per_site']:,} | {s.get('intents', 77)} | {s['partition']} "
                     f"| {s['unit']} | {eps} | {server_step(s, r['row'])} | {head_init(s)} | {features(r)} | {f1:.3f} "
                     f"| {ratio} | {s['rounds']} | {r['cpu_s']:,} |")
    lines.append("\n† against the pooled reference measured at another number of records per site.")
    return "\n".join(lines)


PANELS_PER_LINE = 3


def plot(results: list[dict], path: Path) -> None:
    """One panel per records-per-site, features read, privacy unit and ε (so each panel compares rows of one
    setting), a curve per row; non-DP rows in every panel of their size, features and unit, as references."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    def panel(r: dict) -> tuple:
        s = r["setup"]
        return s["per_site"], features(r), s["unit"]

    panels_of = sorted({(*panel(r), r["setup"]["epsilon"]) for r in results if "-dp" in r["row"]}
                       or {(*panel(r), None) for r in results}, key=lambda p: (p[:3], -(p[3] or 0)))
    lines = -(-len(panels_of) // PANELS_PER_LINE)
    columns = min(len(panels_of), PANELS_PER_LINE)
    figure, panels = pyplot.subplots(lines, columns, figsize=(8.5 * columns, 5 * lines), squeeze=False,
                                     sharey=True)
    for axes, (size, read, unit, epsilon) in zip(panels.flat, panels_of, strict=False):
        for r in results:
            s = r["setup"]
            if panel(r) != (size, read, unit) or ("-dp" in r["row"] and s["epsilon"] != epsilon):
                continue
            step = server_step(s, r["row"])
            label = (f"{r['row']} ({s['partition']}"
                     + (f", {r['distributed']['honest_sites']}/{s['sites']} honest, batch "
                        f"{r['distributed']['expected_batch']:g}" if r.get("distributed") else "")
                     + (f", batch {s['batch_size']}" if s.get("batch_size") else "")
                     + (f", {step}" if step != "fedavg" else "")
                     + (f", seed {s['seed']}" if s.get("seed") else "")
                     + (", label-name head" if head_init(s) == "label-names" else "") + ")")
            rounds = r.get("evaluated_rounds") or range(1, len(r["macro_f1"]) + 1)
            axes.plot([n / s["rounds"] for n in rounds], r["macro_f1"], marker="o", markersize=3, label=label)
        axes.set(xlabel="share of the run's training (a distributed round is one step)",
                 title=f"{results[0]['setup']['sites']} × {size:,} records, per {unit.removeprefix('column:')}"
                       + (f", ε = {epsilon:g}" if epsilon is not None else "")
                       + ("" if read == "mean-pooled" else f", {read}"))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6, loc="lower right")
    for axes in list(panels.flat)[len(panels_of):]:
        axes.set_visible(False)
    for line in panels:
        line[0].set_ylabel("macro-F1 (BANKING77 test split)")
    figure.suptitle("dp-federation: MiniLM + FFA-LoRA, 77 intents, head on the mean-pooled embedding unless named")
    figure.savefig(path, dpi=150, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--results", type=Path, default=Path("runs/dp-federation.jsonl"))
    parser.add_argument("--plot", type=Path, default=None)
    for field in dataclasses.fields(Setup):
        parser.add_argument(f"--{field.name.replace('_', '-')}", default=None)
    args = parser.parse_args(argv)
    given = {kebab(f.name): value for f in dataclasses.fields(Setup) if (value := getattr(args, f.name)) is not None}
    try:
        setup = from_mapping(Setup, given, "the command line", prefix="--", text_values=True)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    if not (BANKING77 / "train.csv").is_file():
        raise SystemExit(f"BANKING77 is not at {BANKING77} (see ../shared/data/banking77/README.md)")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for row in filter(None, args.rows.split(",")):
        if row not in ROWS:
            raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
        print(f"== {row}: {setup}", flush=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps(run(setup, row)) + "\n")
    results = [json.loads(line) for line in args.results.read_text().splitlines()]
    print(table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
