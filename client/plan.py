"""The training plan a site follows each round: expected batch, steps, learning rate, clipping norm.

By default the plan is automatic and computed AT THE SITE from its own number of privacy units n
(never sent), its budget and the planned rounds; any value set in ``train.*`` overrides the rule.
The rule (measured on BANKING77 with MiniLM + FFA-LoRA, BENCHMARKS.md ``dp-federation``): DP-SGD
learns when batches are large and the run is long, because the noise on a mean gradient falls as
σ·C/B while σ grows only slowly with the sampling rate. So:

    expected batch  B = clamp(⌈n/4⌉, min(n, 32), 2,048)        (sampling rate q = B/n)
    steps per round   = ⌈(30 / rounds) / q⌉                      (30 epochs over the whole run)
    learning rate     = 2e-2 (AdamW on lora_B + head)
    clipping norm     = privacy.max-grad-norm (1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import PrivacySettings, TrainSettings

AUTO_SAMPLE_RATE = 0.25
AUTO_MIN_BATCH = 32
AUTO_MAX_BATCH = 2048
AUTO_TOTAL_EPOCHS = 30
AUTO_LEARNING_RATE = 2e-2


@dataclass(frozen=True)
class TrainingPlan:
    batch_size: int
    """Expected units per logical step (Poisson sampling under DP: each unit joins with q = B/n)."""
    units: int
    steps: int
    """Logical steps per round."""
    learning_rate: float
    max_grad_norm: float

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.units


def plan_training(units: int, train: TrainSettings, privacy: PrivacySettings, planned_rounds: int) -> TrainingPlan:
    """The site's plan for one round of ``planned_rounds``; settings left at 0 follow the rule above."""
    if units < 1:
        raise ValueError("a training plan needs at least one unit")
    automatic = min(max(math.ceil(units * AUTO_SAMPLE_RATE), min(units, AUTO_MIN_BATCH)), AUTO_MAX_BATCH)
    batch = min(train.batch_size or automatic, units)
    if train.local_epochs:
        steps = -(-train.local_epochs * units // batch)  # ⌈E·n/B⌉ in integers: E epochs at q = B/n
    else:
        steps = max(1, math.ceil(AUTO_TOTAL_EPOCHS * units / (planned_rounds * batch)))
    return TrainingPlan(batch_size=batch, units=units, steps=steps,
                        learning_rate=train.learning_rate or AUTO_LEARNING_RATE,
                        max_grad_norm=privacy.max_grad_norm)
