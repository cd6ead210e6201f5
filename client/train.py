"""Local training and evaluation at a site: plain functions, no Flower.

With DP on, training is Opacus DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise)
on the trainable LoRA parameters only; logical batches are split into physical chunks so memory
stays bounded however large the DP batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from client.privacy import PrivacyLedger, fresh_generator, make_private, steps_per_epoch
from common.adapter import AdapterState, get_adapter_state
from common.config import TrainSettings
from common.data import EncodedData


class TrainingError(RuntimeError):
    """Local training did not produce a usable update."""


@dataclass(frozen=True)
class LocalResult:
    adapter: AdapterState
    steps: int
    epsilon: float | None
    """ε the site has spent in total after this round (None without DP)."""


def forward_loss(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    input_ids, attention_mask, labels = batch
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(logits, labels)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_locally(
    model: torch.nn.Module,
    data: EncodedData,
    settings: TrainSettings,
    *,
    ledger: PrivacyLedger | None,
    planned_rounds: int,
    server_round: int,
    run_id: int,
) -> LocalResult:
    """Train ``model`` in place for ``settings.local_epochs`` epochs; DP when ``ledger`` is given.

    With DP the round is charged to the ledger before any step (raising BudgetExhausted), so a crash
    never leaves a trained round uncharged. All randomness (dropout, shuffling, Poisson sampling, noise)
    comes from OS entropy, fresh every call: nothing the coordinator knows can replay it.
    """
    if len(data) == 0:
        raise TrainingError("the site has no training examples")
    torch.manual_seed(secrets.randbits(63))  # dropout: torch's default seed is a public constant
    before = torch.cat([p.detach().flatten().clone() for p in _trainable(model)])
    model.train()
    batch_size = min(settings.batch_size, len(data))
    loader = DataLoader(data.dataset, batch_size=batch_size, shuffle=True, generator=fresh_generator())
    optimizer = torch.optim.AdamW(_trainable(model), lr=settings.learning_rate, weight_decay=0.0)
    if ledger is None:
        losses = _train_plain(model, optimizer, loader, settings)
        epsilon = None
    else:
        per_round = steps_per_epoch(len(data), batch_size) * settings.local_epochs
        sample_rate = 1 / steps_per_epoch(len(data), batch_size)
        entry = ledger.charge_round(run_id=run_id, server_round=server_round, sample_rate=sample_rate,
                                    steps=per_round, planned_rounds=planned_rounds)
        engine, private_model, private_optimizer, private_loader = make_private(
            model=model, optimizer=optimizer, loader=loader, ledger=ledger
        )
        try:
            losses = _train_private(private_model, private_optimizer, private_loader, settings)
        finally:
            private_model._close()  # remove Opacus hooks; the PeftModel inside is ours again
        charged = [(ledger.plan.noise_multiplier, sample_rate, per_round)]
        if [tuple(step) for step in engine.accountant.history] != charged:
            # (no values in the message: it goes to the coordinator, and σ, q, steps pin the site's n)
            raise TrainingError("bug: Opacus' accountant disagrees with the round charged to the ledger")
        epsilon = entry.epsilon
    model.eval()
    after = torch.cat([p.detach().flatten() for p in _trainable(model)])
    if torch.equal(before, after):
        raise TrainingError("no trainable parameter changed: the adapter is not being trained (device or freeze bug)")
    if not torch.isfinite(after).all():
        raise TrainingError("training diverged (non-finite adapter weights); lower train.learning-rate")
    return LocalResult(get_adapter_state(model), len(losses), epsilon)


def _train_plain(model, optimizer, loader, settings: TrainSettings) -> list[float]:
    losses = []
    for _ in range(settings.local_epochs):
        for batch in loader:
            optimizer.zero_grad()
            size = len(batch[0])
            total = 0.0
            for start in range(0, size, settings.physical_batch_size):
                chunk = [t[start:start + settings.physical_batch_size] for t in batch]
                loss = forward_loss(model, chunk) * (len(chunk[0]) / size)
                loss.backward()
                total += loss.item()
            optimizer.step()
            losses.append(total)
    return losses


def _train_private(model, optimizer, loader, settings: TrainSettings) -> list[float]:
    """DP-SGD; returns the mean loss of each logical step (0 for an empty Poisson batch)."""
    losses: list[float] = []
    for _ in range(settings.local_epochs):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=settings.physical_batch_size,
                                optimizer=optimizer) as chunks:
            step_loss, step_examples = 0.0, 0
            for chunk in chunks:
                optimizer.zero_grad()
                if len(chunk[0]) == 0:
                    # An empty Poisson batch: no forward (BERT cannot reshape 0 rows), zero per-sample
                    # gradients, and still a step, so the noise is added and the accountant advances.
                    for param in optimizer.params:
                        param.grad_sample = torch.zeros((1, *param.shape), dtype=param.dtype, device=param.device)
                else:
                    loss = forward_loss(model, chunk)
                    loss.backward()
                    step_loss += loss.item() * len(chunk[0])
                    step_examples += len(chunk[0])
                optimizer.step()
                if not optimizer._is_last_step_skipped:  # a logical (Poisson) batch ended
                    losses.append(step_loss / max(1, step_examples))
                    step_loss, step_examples = 0.0, 0
    return losses
