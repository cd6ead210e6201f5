"""Local training at a site: plain functions, no Flower.

Each round follows the site's :class:`client.plan.TrainingPlan` (``plan.steps`` logical steps of
expected size ``plan.batch_size`` units), computed from its public size (:func:`public_size`), never from
its true number of units. With DP on, a step is DP-SGD: every privacy unit the site holds joins the
batch independently with probability q (Poisson), each row's gradient of the trainable linear layers
(LoRA's B, a head) is formed exactly from one backward pass (client/per_unit_grads.py), each UNIT's summed
gradient is clipped to C (a person with ten rows moves the update no more than a person with one), and
Gaussian noise σ·C is added to the sum.

A logical batch is split into physical chunks of rows sorted by length, each trimmed to its own
longest row (padding per chunk, not to the site's longest record): DP or not, the same arithmetic.
A chunk holds at most ``physical_batch_tokens`` tokens (rows × its padded width), except a unit whose rows
alone exceed it (a unit is never split): with at most the site's max-rows-per-unit rows of at most
data.max-length tokens, no unit can make a pass larger than the site's policy allows. A unit whose longest
row is at most half a chunk's width starts a new chunk (:data:`PASS_WIDTH_RATIO`): with record units padding at
most doubles a pass, and a small batch's short rows are not padded to its longest (BENCHMARKS.md,
`pass_packing`: a 5 × 400 distributed round's passes 2.18× faster, a pooled batch of 500 1.07×).

Under DP no failure of a round depends on one unit (client/per_unit_grads.py): a unit whose gradient is not
finite contributes zero, and a pass that raises is retried unit by unit, a unit that raises alone
contributing zero. A pass on public rows first (``UnitBatches.probe``) keeps a model that cannot train at
all from being mistaken for such units.
"""

from __future__ import annotations

import copy
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from client.canaries import Canary, included_coordinates, joining
from client.per_unit_grads import PerUnitDPSGD
from client.plan import TrainingPlan, plan_training
from client.privacy import PrivacyLedger, fresh_generator
from common.adapter import AdapterState, get_adapter_state
from common.causal_lm import answer_loss
from common.config import PrivacySettings, TaskKind, TrainSettings
from common.encoding import EncodedData

PASS_WIDTH_RATIO = 2
"""A unit whose longest row is at most 1/PASS_WIDTH_RATIO of a chunk's width starts a new chunk."""
log = logging.getLogger("fedtune.client")


class TrainingError(RuntimeError):
    """Local training did not produce a usable update."""


@dataclass(frozen=True)
class LocalResult:
    adapter: AdapterState
    steps: int
    epsilon: float | None
    """ε the site has spent in total after this round (None without DP)."""
    optimizer_state: dict
    """The site's AdamW state after the round, to continue from next round (it never leaves the site)."""


@dataclass(frozen=True)
class Chunk:
    """One forward pass: rows (sorted by length, trimmed to the longest) and each row's unit within the chunk."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    """A class per row, or (causal-lm) the next token at each position, -100 outside the answer."""
    unit_of_row: torch.Tensor
    units: int
    task: TaskKind = "classification"

    def each_unit(self) -> list[Chunk]:
        """The same rows as one pass per unit (a pass that raised is retried so: a unit's failure stays its own)."""
        alone = [(self.unit_of_row == unit).nonzero().flatten() for unit in range(self.units)]
        return [Chunk(self.input_ids[rows], self.attention_mask[rows], self.labels[rows],
                      torch.zeros_like(rows), 1, self.task) for rows in alone]


def forward_loss(model: torch.nn.Module, chunk: Chunk) -> torch.Tensor:
    """The chunk's mean loss over rows (causal-lm: each row's mean answer-token loss, then over rows)."""
    if chunk.task == "causal-lm":
        return answer_loss(model, chunk.input_ids, chunk.attention_mask, chunk.labels)
    logits = model(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask).logits
    return F.cross_entropy(logits, chunk.labels)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def public_size(units: int, declared: int | None, ledger: PrivacyLedger | None, *, run_id: int,
                server_round: int) -> int:
    """The size a site plans from: the size it declares (public on purpose; free), else with DP its estimate ñ of
    its ``units`` (drawn once, charged to ``ledger``), else ``units`` itself (without DP nothing is protected)."""
    if declared is not None:
        return declared
    if ledger is None:
        return units
    return ledger.estimated_units(units, run_id=run_id, server_round=server_round)


def train_locally(
    model: torch.nn.Module,
    data: EncodedData,
    settings: TrainSettings,
    *,
    ledger: PrivacyLedger | None,
    planned_rounds: int,
    server_round: int,
    run_id: int,
    privacy: PrivacySettings | None = None,
    optimizer_state: dict | None = None,
    public_units: int | None = None,
    canaries: tuple[Canary, ...] = (),
) -> LocalResult:
    """Train ``model`` in place for one round of the site's plan; DP when ``ledger`` is given.

    ``public_units``: the size the plan is computed from (:func:`public_size`; by default the ledger's estimate).
    ``canaries``: the site's privacy-audit canaries (client/canaries.py); the included ones join each DP-SGD step
    at rate q, as units do. Only under DP: there is no DP-SGD step to put them in otherwise.
    ``optimizer_state`` (the previous round's ``LocalResult.optimizer_state``) continues AdamW's moment
    estimates across rounds. Measured in ``dp-federation --site-optimizer kept``, it did not help (BENCHMARKS.md),
    so the ClientApp starts each round with a fresh AdamW.

    With DP the round is charged to the ledger before any step (raising BudgetExhausted), so a crash
    never leaves a trained round uncharged. All randomness (dropout, order, Poisson sampling, which rows
    of a large unit, noise) comes from OS entropy, fresh every call: nothing the coordinator knows can replay it.
    """
    if len(data) == 0:
        raise TrainingError("the site has no training examples")
    if canaries and ledger is None:
        raise ValueError("audit canaries go in the DP-SGD step: a run without DP has none to audit")
    privacy = ledger.settings if ledger is not None else (privacy or PrivacySettings(enabled=False))
    if public_units is None:
        public_units = public_size(data.unit_count, None, ledger, run_id=run_id, server_round=server_round)
    plan = plan_training(public_units, settings, privacy, planned_rounds)
    torch.manual_seed(secrets.randbits(63))  # dropout: torch's default seed is a public constant
    before = torch.cat([p.detach().flatten().clone() for p in _trainable(model)])
    model.train()
    optimizer = torch.optim.AdamW(_trainable(model), lr=plan.learning_rate, weight_decay=0.0)
    if optimizer_state is not None:
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))  # AdamW updates its state in place
    batches = UnitBatches(data, plan, settings, poisson=ledger is not None, device=next(model.parameters()).device)
    if ledger is None:
        steps = _train_plain(model, optimizer, batches)
        epsilon = None
    else:
        entry = ledger.charge_round(run_id=run_id, server_round=server_round, sample_rate=plan.sample_rate,
                                    steps=plan.steps, planned_rounds=planned_rounds)
        steps = _train_private(model, optimizer, batches, ledger, canaries)
        if steps != plan.steps:
            raise TrainingError("bug: the steps taken differ from the round charged to the ledger")
        epsilon = entry.epsilon
    model.eval()
    # Under DP both checks read only the weights after the noised steps (post-processing of what ε covers): a
    # unit's gradient entered them clipped to C or as zero, so neither check can turn on one unit.
    after = torch.cat([p.detach().flatten() for p in _trainable(model)])
    if torch.equal(before, after):
        raise TrainingError("no trainable parameter changed: the adapter is not being trained (device or freeze bug)")
    if not torch.isfinite(after).all():
        raise TrainingError("training diverged (non-finite adapter weights); lower train.learning-rate")
    return LocalResult(get_adapter_state(model), steps, epsilon, optimizer.state_dict())


class UnitBatches:
    """The round's logical batches, each a list of chunks; units drawn with OS entropy.

    DP: each step, every unit the site holds joins independently with probability q (Poisson; a batch may be
    empty, or larger than the plan's B when the site holds more units than its public size).
    Without DP: epochs of shuffled units cut into batches of B. A unit with more than
    ``max_rows_per_unit`` rows contributes that many of them, drawn afresh each step.
    """

    def __init__(self, data: EncodedData, plan: TrainingPlan, settings: TrainSettings, *, poisson: bool,
                 device: torch.device | str = "cpu") -> None:
        self.data, self.plan, self.poisson, self.device = data, plan, poisson, torch.device(device)
        self.tokens, self.cap = settings.physical_batch_tokens, settings.max_rows_per_unit
        self.rows = data.rows_by_unit()
        self.units = data.unit_count
        self.lengths = data.dataset.tensors[1].sum(1).numpy()  # tokens per row (attention mask)
        self.generator = fresh_generator()
        self.rng = np.random.default_rng(secrets.randbits(128))

    def __iter__(self) -> Iterator[list[Chunk]]:
        order: list[int] = []
        for _ in range(self.plan.steps):
            if self.poisson:
                drawn = torch.rand(self.units, generator=self.generator) < self.plan.sample_rate
                units = drawn.nonzero().flatten().tolist()
            else:
                if len(order) < self.plan.batch_size:
                    order += torch.randperm(self.units, generator=self.generator).tolist()
                units, order = order[:self.plan.batch_size], order[self.plan.batch_size:]
            yield self.chunks(units)

    def chunks(self, units: list[int]) -> list[Chunk]:
        """Units packed, longest first, into passes of at most ``tokens`` tokens: rows × the pass's padded
        width, the length of its first (longest) row, and of units whose longest row is more than half that
        width. A unit is never split: one that alone exceeds the budget has a pass of its own."""
        members = []
        for unit in units:
            rows = self.rows[unit]
            if len(rows) > self.cap:
                rows = self.rng.choice(rows, size=self.cap, replace=False)
            members.append(np.sort(rows))
        members.sort(key=lambda rows: -int(self.lengths[rows].max()))
        chunks: list[Chunk] = []
        current: list[np.ndarray] = []
        for rows in members:
            width = int(self.lengths[current[0]].max()) if current else 0
            if current and ((sum(map(len, current)) + len(rows)) * width > self.tokens
                            or PASS_WIDTH_RATIO * int(self.lengths[rows].max()) <= width):
                chunks.append(self._chunk(current))
                current = []
            current.append(rows)
        if current:
            chunks.append(self._chunk(current))
        return chunks

    def probe(self) -> Chunk:
        """One public row (token 0, class or target 0): what ``PerUnitDPSGD.check_trains`` runs first."""
        token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        target = token if self.data.task == "causal-lm" else token[0]
        return Chunk(token, torch.ones_like(token), target, torch.zeros(1, dtype=torch.long, device=self.device), 1,
                     self.data.task)

    def _chunk(self, members: list[np.ndarray]) -> Chunk:
        index = torch.from_numpy(np.concatenate(members))
        input_ids, attention_mask, labels = (t[index] for t in self.data.dataset.tensors)
        width = int(attention_mask.any(0).nonzero().max()) + 1
        unit_of_row = torch.repeat_interleave(torch.arange(len(members)), torch.tensor([len(m) for m in members]))
        if self.data.task == "causal-lm":
            labels = labels[:, :width]
        to = self.device
        return Chunk(input_ids[:, :width].to(to), attention_mask[:, :width].to(to), labels.to(to), unit_of_row.to(to),
                     len(members), self.data.task)


def _train_plain(model, optimizer, batches: UnitBatches) -> int:
    steps = 0
    for chunks in batches:
        optimizer.zero_grad()
        rows = sum(len(chunk.labels) for chunk in chunks)
        for chunk in chunks:
            (forward_loss(model, chunk) * (len(chunk.labels) / rows)).backward()
        optimizer.step()
        steps += 1
    return steps


def _train_private(model, optimizer, batches: UnitBatches, ledger: PrivacyLedger, canaries: tuple[Canary, ...]) -> int:
    """DP-SGD over the round's Poisson batches (σ from the ledger's plan, noise from OS entropy); returns the
    number of (noised) steps taken. An empty Poisson batch still takes its step: noise only, as charged.
    Each included canary joins each step with the units' rate q."""
    assert ledger.plan is not None, "charge_round() first"
    dp_sgd = PerUnitDPSGD(model, optimizer, noise_multiplier=ledger.plan.noise_multiplier,
                          max_grad_norm=batches.plan.max_grad_norm, expected_batch_size=batches.plan.batch_size,
                          generator=fresh_generator(next(model.parameters()).device))
    included = included_coordinates(model, canaries)

    def loss_of(chunk: Chunk) -> torch.Tensor:
        return forward_loss(model, chunk)

    dp_sgd.check_trains(batches.probe(), loss_of)
    steps = 0
    for chunks in batches:
        dp_sgd.step(chunks, loss_of, joining(included, batches.plan.sample_rate, batches.generator))
        steps += 1
    if dp_sgd.zeroed_units:
        log.warning("%d unit passes contributed zero this round (a gradient not finite, or a pass that raised on "
                    "the unit alone: see above); the update is DP as charged", dp_sgd.zeroed_units)
    return steps
