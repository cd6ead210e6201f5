"""A site's part of one round of distributed DP-SGD (common/distributed_dp.py): one step of the pooled data.

The site Poisson-samples its units at the run's PUBLIC rate q (OS entropy), forms each sampled unit's clipped
gradient with the per-unit machinery (client/per_unit_grads.py: clip C, a unit whose pass fails contributes zero),
encodes each unit as integers (rotation, scale γ, conditional rounding: ‖·‖₂ ≤ Δ₂ whatever the rounding), sums
them and adds its noise share: the vector mod 2^b it uploads through secure aggregation. Nothing else leaves the
site: not its true size (only its public one, at the size query: declared, or its charged DP estimate) nor how many
of its units this step drew (the server divides by the public expected batch).

Coordinates follow the adapter's wire order (common.adapter.trainable_keys), so the server's decoded sum lines
up with the update it applies (server/distributed_step.py).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from peft import get_peft_model_state_dict

from client.per_unit_grads import PerUnitClipping
from client.plan import TrainingPlan
from client.privacy import fresh_generator
from client.train import Chunk, UnitBatches, forward_loss
from common.adapter import unwrap
from common.config import TrainSettings
from common.distributed_dp import DistributedDpPlan, Ring, encode_units, with_noise_share
from common.encoding import EncodedData


def wire_layout(model: torch.nn.Module, keys: list[str]) -> list[tuple[torch.nn.Parameter, int]]:
    """Each trained parameter and its offset in the flattened update over ``keys`` (the adapter's wire order); a key
    that is not a trained parameter, or a trained parameter that is not sent, is refused."""
    state = get_peft_model_state_dict(unwrap(model))  # views of the parameters: matched by storage
    trained = {param.data_ptr(): param for param in model.parameters() if param.requires_grad}
    layout, offset = [], 0
    for key in keys:
        param = trained.pop(state[key].data_ptr(), None)
        if param is None or param.shape != state[key].shape:
            raise ValueError(f"{key} is sent but not trained at the site: the model's trainable set does not match "
                             "the adapter's layout (lora.aggregation)")
        layout.append((param, offset))
        offset += param.numel()
    if trained:
        raise ValueError(f"{len(trained)} trained parameter(s) are not in the adapter's layout: their gradient "
                         "would be dropped")
    return layout


def distributed_contribution(model: torch.nn.Module, data: EncodedData, plan: DistributedDpPlan, *, keys: list[str],
                             seed: int, settings: TrainSettings) -> Ring:
    """The site's upload for the round whose public rotation seed is ``seed``: (Σ over its Poisson-sampled units of
    each unit's encoded clipped gradient + its Skellam share) mod 2^b, [d'] uint64. ``model`` holds the round's
    global adapter; it is not changed (the server takes the step)."""
    layout = wire_layout(model, keys)
    dimension = sum(param.numel() for param, _ in layout)
    if dimension != plan.settings.dimension:
        raise ValueError(f"the adapter sends {dimension} values, the distributed-DP plan is for "
                         f"{plan.settings.dimension}: plan with this adapter's layout")
    torch.manual_seed(secrets.randbits(63))  # dropout: torch's default seed is a public constant
    model.train()
    clipping = PerUnitClipping(model, max_grad_norm=plan.settings.clip)
    device = next(model.parameters()).device
    chunking = TrainingPlan(batch_size=1, units=max(1, data.unit_count), steps=1, learning_rate=0.0,
                            max_grad_norm=plan.settings.clip)  # only its chunks are used: sampling is below
    batches = UnitBatches(data, chunking, settings, poisson=True, device=device)

    def loss_of(chunk: Chunk) -> torch.Tensor:
        return forward_loss(model, chunk)

    clipping.check_trains(batches.probe(), loss_of)
    drawn = torch.rand(data.unit_count, generator=fresh_generator()) < plan.settings.sample_rate
    encoded = np.zeros(plan.padded_dimension, dtype=np.int64)
    for clipped in clipping.each_pass(batches.chunks(drawn.nonzero().flatten().tolist()), loss_of):
        units = next(iter(clipped.values())).shape[0]
        flat = torch.zeros((units, dimension), dtype=torch.float64)
        for param, offset in layout:
            if param in clipped:
                flat[:, offset:offset + param.numel()] = clipped[param].reshape(units, -1).double().cpu()
        encoded += encode_units(plan, flat.numpy(), seed)
    model.zero_grad(set_to_none=True)
    return with_noise_share(plan, encoded)
