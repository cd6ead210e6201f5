"""What a site's contribution looks like inside the securely aggregated vector, and its round parameters.

Nothing private travels in the clear: the weighted update AND the example count, the training
loss and the federated-evaluation counts all ride inside the masked vector, so the server
learns only their sums.

    values  u = clip_L2((n / W) · Δ, C)             W = secagg.max-examples (public cap), C = secagg.clip
    counts  [n, round(10·Σ train loss), clipped?, round(10·Σ eval loss), confusion (K×K)...]

Server side: mean Δ = W · Σu / Σn. With ``b`` value bits, step = 2C/(2^b − 1), and stochastic
rounding, each element of the mean is within  W · s · step · (1 + 2^-16) / Σn  of the exact
weighted mean of the (clipped) updates, for s surviving sites (common.secagg.fixedpoint).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from common.config import SecureAggSettings
from common.evaluation import EvalCounts
from common.secagg import AggregateResult, SecAggParams, clip_l2, error_bound
from common.secagg.fixedpoint import MAX_MODULUS_BITS, MAX_VALUE_BITS

MAX_COUNT = (1 << 20) - 1
"""Largest count one site may put in a slot; larger metrics are clamped (never the example count)."""
FIXED_SLOTS = 4  # examples, train loss ·10, clipped flag, eval loss ·10
LOSS_SCALE = 10


def count_slots(num_labels: int) -> int:
    return FIXED_SLOTS + num_labels * num_labels


def value_bits_for(n_sites: int) -> int:
    """The finest quantisation whose sum over ``n_sites`` still fits the 35-bit wire modulus."""
    headroom = MAX_MODULUS_BITS - math.ceil(math.log2(n_sites + 1))
    return max(1, min(MAX_VALUE_BITS, headroom))


def round_params(settings: SecureAggSettings, *, run_id: int, server_round: int, site_ids: list[int],
                 vector_length: int, num_labels: int) -> SecAggParams:
    """The one definition of a round's public parameters; both sides check them against their own config."""
    return SecAggParams(
        round_id=f"fedtune/run-{run_id}/round-{server_round}".encode(),
        site_ids=tuple(site_ids),
        vector_length=vector_length,
        clip=settings.clip,
        value_bits=value_bits_for(len(site_ids)),
        count_slots=count_slots(num_labels),
        max_count=MAX_COUNT,
        degree=settings.degree,
        threshold=settings.threshold,
        all_pairs=settings.all_pairs,
    )


def params_to_bytes(params: SecAggParams) -> bytes:
    return json.dumps({
        "round_id": params.round_id.hex(), "site_ids": list(params.site_ids), "vector_length": params.vector_length,
        "clip": params.clip, "value_bits": params.value_bits, "count_slots": params.count_slots,
        "max_count": params.max_count, "degree": params.degree, "threshold": params.threshold,
        "all_pairs": params.all_pairs, "rounding": params.rounding, "modulus_bits": params.modulus_bits,
    }, sort_keys=True).encode()


def params_from_bytes(data: bytes) -> SecAggParams:
    fields = json.loads(data)
    fields["round_id"] = bytes.fromhex(fields["round_id"])
    fields["site_ids"] = tuple(fields["site_ids"])
    return SecAggParams(**fields)


@dataclass(frozen=True)
class Contribution:
    """A site's round, before masking."""

    delta: np.ndarray
    num_examples: int
    train_loss: float
    evaluation: EvalCounts


def encode_contribution(c: Contribution, settings: SecureAggSettings) -> tuple[np.ndarray, list[int], bool]:
    """(values, counts, clipped): the site's masked-vector contents."""
    weight = min(c.num_examples, settings.max_examples) / settings.max_examples
    values, clipped = clip_l2(weight * c.delta.astype(np.float64), settings.clip)
    counts = [
        min(c.num_examples, MAX_COUNT),
        min(round(LOSS_SCALE * c.train_loss * c.num_examples), MAX_COUNT),
        int(clipped),
        min(round(LOSS_SCALE * c.evaluation.loss_sum), MAX_COUNT),
        *(min(int(v), MAX_COUNT) for v in c.evaluation.confusion.ravel()),
    ]
    return values, counts, clipped


@dataclass(frozen=True)
class SecureSum:
    """What the server learns from a secure round: sums only."""

    mean_delta: np.ndarray
    num_examples: int
    train_loss: float
    clipped_sites: int
    evaluation: EvalCounts
    error_bound: float
    """Per-element bound on |mean_delta − exact weighted mean of the clipped updates|."""


def decode_sum(result: AggregateResult, settings: SecureAggSettings, num_labels: int,
               params: SecAggParams) -> SecureSum:
    counts = result.counts
    examples = int(counts[0])
    if examples <= 0:
        raise ValueError("the aggregate counts no examples")
    scale = settings.max_examples / examples
    confusion = np.asarray(counts[FIXED_SLOTS:], dtype=np.int64).reshape(num_labels, num_labels)
    bound = error_bound(len(result.survivors), params.value_bits, params.clip, params.rounding) * scale
    return SecureSum(
        mean_delta=(result.sum_vector * scale).astype(np.float32),
        num_examples=examples,
        train_loss=counts[1] / LOSS_SCALE / examples,
        clipped_sites=int(counts[2]),
        evaluation=EvalCounts(counts[3] / LOSS_SCALE, confusion),
        error_bound=float(bound),
    )
