"""``privacy-audit``: the one-run audit (common/privacy_audit.py) of the site's own DP-SGD step on a tiny model.

A frozen random layer and a trainable head (the shape of LoRA: only linear layers train) learn a synthetic
10-class task with the site's PerUnitDPSGD and AdamW, Poisson sampling at rate q, and m white-box gradient
canaries (client/canaries.py): half included at random, each joining a step with rate q. The audited lower
bound is set against the ε the site's accountant claims for the same (σ, q, steps); with the noise off, the
same claim is false and the audit must say so. The utility cost of the canaries: each run is paired with a twin
trained without them (same task and initial head, fresh noise). No pre-trained weights: a run takes about a second.

    python -m simulations.benchmarks.privacy_audit --epsilon 1 3 8 --runs 5 --canaries 200 [--separation 0.6]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from client.canaries import coordinates, draw_canaries, included_coordinates, joining, scores
from client.per_unit_grads import PerUnitDPSGD
from client.privacy import epsilon_of, fresh_generator, noise_multiplier_for
from common.privacy_audit import AuditResult, audit

FEATURES, HIDDEN, CLASSES = 16, 256, 10
ACCOUNTANT, DELTA = "rdp", 1e-5


@dataclass(frozen=True)
class Setting:
    """One audited training run: the site's DP-SGD at (σ, q, steps) on ``units`` one-row units."""

    noise_multiplier: float
    units: int = 1000
    sample_rate: float = 0.05
    steps: int = 300
    canaries: int = 200
    rows_per_unit: int = 1
    """Rows each unit (person) holds: > 1 audits the per-person guarantee (a canary is one person's clipped sum)."""
    max_grad_norm: float = 1.0
    learning_rate: float = 0.01
    separation: float = 1.5
    """Scale of the class centres (rows are unit-variance around them): lower is a harder task."""

    def claimed_epsilon(self, noise_multiplier: float | None = None) -> float:
        """What the site's accountant says these steps cost at σ (by default this setting's own)."""
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return epsilon_of(ACCOUNTANT, ((sigma, self.sample_rate, self.steps),), DELTA)


@dataclass(frozen=True)
class Rows:
    """One pass of rows and the unit each belongs to, numbered 0.. (client.per_unit_grads.RowBatch)."""

    features: torch.Tensor
    labels: torch.Tensor
    unit_of_row: torch.Tensor

    @property
    def units(self) -> int:
        return int(self.unit_of_row.max()) + 1 if len(self.unit_of_row) else 0

    def each_unit(self) -> list[Rows]:
        return [self.of_units(torch.tensor([u])) for u in range(self.units)]

    def of_units(self, units: torch.Tensor) -> Rows:
        """The rows of ``units``, renumbered 0..len(units)-1."""
        rows = torch.isin(self.unit_of_row, units).nonzero().flatten()
        return Rows(self.features[rows], self.labels[rows], torch.searchsorted(units, self.unit_of_row[rows]))


@dataclass(frozen=True)
class Outcome:
    result: AuditResult
    accuracy: float
    """Of the trained head on fresh rows of the same task."""
    accuracy_without: float | None = None
    """Of its twin: the same task and initial head trained without canaries (a paired run), if asked for."""


def _task(rows: int, centres: torch.Tensor, generator: torch.Generator, rows_per_unit: int = 1) -> Rows:
    labels = torch.randint(CLASSES, (rows,), generator=generator)
    return Rows(centres[labels] + torch.randn(rows, FEATURES, generator=generator), labels,
                torch.arange(rows) // rows_per_unit)


def _train(model: torch.nn.Module, data: Rows, setting: Setting, canaries: list[tuple[torch.nn.Parameter, int]],
           generator: torch.Generator) -> torch.nn.Module:
    """The site's DP-SGD (PerUnitDPSGD, AdamW) over Poisson batches, with the included ``canaries`` joining each
    step at the same rate as units."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setting.learning_rate,
                                  weight_decay=0.0)
    dp_sgd = PerUnitDPSGD(model, optimizer, noise_multiplier=setting.noise_multiplier,
                          max_grad_norm=setting.max_grad_norm,
                          expected_batch_size=round(setting.units * setting.sample_rate), generator=generator)

    def loss_of(rows: Rows) -> torch.Tensor:
        return F.cross_entropy(model(rows.features), rows.labels)

    for _ in range(setting.steps):
        drawn = (torch.rand(setting.units, generator=generator) < setting.sample_rate).nonzero().flatten()
        chunks = [data.of_units(drawn)] if len(drawn) else []
        dp_sgd.step(chunks, loss_of, joining(canaries, setting.sample_rate, generator))
    return model


def _accuracy(model: torch.nn.Module, rows: Rows) -> float:
    with torch.no_grad():
        return float((model(rows.features).argmax(1) == rows.labels).float().mean())


def audited_training(setting: Setting, *, claimed_epsilon: float, paired: bool = False) -> Outcome:
    """Train with the site's DP step and its canaries and audit the run against ``claimed_epsilon``; ``paired``:
    also train a twin without canaries (same task and initial head, fresh noise). All randomness is OS entropy,
    as at a site."""
    generator = fresh_generator()
    centres = setting.separation * torch.randn(CLASSES, FEATURES, generator=generator)
    data = _task(setting.units * setting.rows_per_unit, centres, generator, setting.rows_per_unit)
    fresh = _task(2000, centres, generator)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES))
    model[0].requires_grad_(False)  # frozen, as a base model; the head trains, as LoRA's B
    twin = copy.deepcopy(model) if paired else None
    canaries = draw_canaries(model, setting.canaries)
    first = coordinates(model, canaries)
    _train(model, data, setting, included_coordinates(model, canaries), generator)
    result = audit(scores(first, coordinates(model, canaries)), [c.included for c in canaries], DELTA,
                   epsilon_accounted=claimed_epsilon)
    without = _accuracy(_train(twin, data, setting, [], generator), fresh) if twin is not None else None
    return Outcome(result, _accuracy(model, fresh), without)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows-per-unit", type=int, default=1, help="> 1: each unit is a person with this many rows")
    parser.add_argument("--separation", type=float, default=Setting.separation,
                        help="scale of the class centres: lower is a harder task")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other
    print("| claimed ε | σ | audited ε (mean, max of runs) | membership AUC | accuracy with canaries | without "
          "(paired) | difference (mean ± s.e.) |")
    print("|---|---|---|---|---|---|---|")
    base = Setting(0.0, canaries=args.canaries, steps=args.steps, separation=args.separation,
                   rows_per_unit=args.rows_per_unit)
    for epsilon in [*args.epsilon, None]:
        planned = noise_multiplier_for(ACCOUNTANT, epsilon or 1.0, DELTA, base.sample_rate, base.steps)
        setting = dataclasses.replace(base, noise_multiplier=planned if epsilon is not None else 0.0)
        claimed = setting.claimed_epsilon(planned)
        runs = [audited_training(setting, claimed_epsilon=claimed, paired=True) for _ in range(args.runs)]
        audited = [run.result.epsilon for run in runs]
        costs = [run.accuracy - (run.accuracy_without or 0.0) for run in runs]
        spread = statistics.stdev(costs) / len(costs) ** 0.5 if len(costs) > 1 else float("nan")
        print(f"| {'off (claims ε=1)' if epsilon is None else f'{epsilon:g}'} | {setting.noise_multiplier:.3f} | "
              f"{statistics.mean(audited):.2f}, {max(audited):.2f} | "
              f"{statistics.mean(run.result.auc for run in runs):.2f} | "
              f"{statistics.mean(run.accuracy for run in runs):.3f} | "
              f"{statistics.mean(run.accuracy_without or 0.0 for run in runs):.3f} | "
              f"{statistics.mean(costs):+.3f} ± {spread:.3f} |", flush=True)


if __name__ == "__main__":
    main()
