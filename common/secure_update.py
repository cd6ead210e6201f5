"""What a site's contribution is inside the securely aggregated vector, and its round parameters.

Nothing computed on a site's records travels besides its DP update and, in an evaluation round, its noisy
evaluation counts (common.federated_eval) in the count slots: no example count, no training loss, no evaluation
outside DP. A site's weight is public by construction (equal,
or a size the site declares in its own policy, never derived from its records), so it travels
in the clear and the server sums the survivors' weights itself: a hostile site cannot fake the
total it is divided by.

    values  u = clip_L2((w / W) · Δ, C)     w = min(declared weight, W), W = secagg.max-examples, C = secagg.clip
                                            equal weights: w = W, so u = Δ

Server side: mean Δ = W · Σu / Σw, its L2 norm bounded by W·s·C/Σw (what s honest inputs reach).
With ``b`` value bits, step = 2C/(2^b − 1), and stochastic rounding, each element of the mean is
within  W · s · step · (1 + 2^-16) / Σw  of the exact weighted mean of the (clipped) updates, for s
surviving sites (common.secagg.fixedpoint).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import numpy as np

from common.config import SecureAggSettings
from common.secagg import AggregateResult, ParameterError, SecAggParams, clip_l2, error_bound
from common.secagg.fixedpoint import MAX_MODULUS_BITS, MAX_VALUE_BITS

log = logging.getLogger("fedtune.server")
COUNT_SLOTS = 0
"""The count slots of a round without federated evaluation: nothing but the update is summed (weights are public)."""
MAX_COUNT = (1 << 20) - 1


def value_bits_for(n_sites: int) -> int:
    """The finest quantisation whose sum over ``n_sites`` still fits the 35-bit wire modulus."""
    headroom = MAX_MODULUS_BITS - math.ceil(math.log2(n_sites + 1))
    return max(1, min(MAX_VALUE_BITS, headroom))


ALL_PAIRS_UP_TO = 64
"""Rounds of at most this many sites mask every pair by default (no graph for anyone to choose)."""


def secure_round_id(run_id: int, server_round: int, noise_plan: bytes = b"") -> bytes:
    """A round's id, which every signed bundle, share and survivor list binds (through the params' digest):
    ``fedtune/run-{run_id}/round-{server_round}``, and in distributed DP mode the digest of the round's public noise
    plan (common.distributed_round.RingRound.digest). Honest sites that computed different noise plans (a
    coordinator that told them different public totals, honest-site counts or run configs) hold different round
    ids, so they never share a round: no site's noise can be smaller than the plan another site counted on."""
    return f"fedtune/run-{run_id}/round-{server_round}".encode() + (b"/noise-" + noise_plan.hex().encode()
                                                                      if noise_plan else b"")


def round_params(settings: SecureAggSettings, *, run_id: int, server_round: int, site_ids: list[int],
                 vector_length: int, members_digest: bytes, count_slots: int = COUNT_SLOTS,
                 ring_bits: int = 0) -> SecAggParams:
    """The coordinator's offer of a round's public parameters; each site checks it against its own policy.
    ``members_digest``: the digest of the coordinator's registry, which a site accepts only if it is the
    member list the site pinned. ``count_slots``: the round's evaluation counts (EvalPlan.slots_in), each in
    [0, MAX_COUNT]. ``ring_bits``: the sites' vectors are integers mod 2^b already (distributed DP: no fixed point;
the coordinator then puts the round's noise plan into the round id, :func:`secure_round_id`, once its threshold
says which h the round takes).

    Up to :data:`ALL_PAIRS_UP_TO` sites every pair masks (``secagg.degree``/``threshold`` apply only
    with ``secagg.all-pairs`` there); larger federations use a sparse graph unless all-pairs is set.
    """
    all_pairs = settings.all_pairs or len(site_ids) <= ALL_PAIRS_UP_TO
    return SecAggParams(
        round_id=secure_round_id(run_id, server_round),
        site_ids=tuple(site_ids),
        vector_length=vector_length,
        clip=settings.clip,
        value_bits=value_bits_for(len(site_ids)),
        count_slots=count_slots,
        max_count=MAX_COUNT,
        degree=0 if all_pairs else settings.degree,
        threshold=settings.threshold if settings.all_pairs or not all_pairs else 0,
        all_pairs=all_pairs,
        members_digest=members_digest,
        ring_bits=ring_bits,
    )


def params_to_bytes(params: SecAggParams) -> bytes:
    return json.dumps({
        "round_id": params.round_id.hex(), "site_ids": list(params.site_ids), "vector_length": params.vector_length,
        "clip": params.clip, "value_bits": params.value_bits, "count_slots": params.count_slots,
        "max_count": params.max_count, "degree": params.degree, "threshold": params.threshold,
        "all_pairs": params.all_pairs, "rounding": params.rounding, "modulus_bits": params.modulus_bits,
        "members_digest": params.members_digest.hex(), "ring_bits": params.ring_bits,
    }, sort_keys=True).encode()


_PARAM_TYPES = {"round_id": str, "site_ids": list, "vector_length": int, "clip": float, "value_bits": int,
                "count_slots": int, "max_count": int, "degree": int, "threshold": int, "all_pairs": bool,
                "rounding": str, "modulus_bits": int, "members_digest": str, "ring_bits": int}


def params_from_bytes(data: bytes) -> SecAggParams:
    """Parse an offer from the coordinator; anything malformed or unsafe raises ParameterError."""
    try:
        fields = json.loads(data)
        if not isinstance(fields, dict) or set(fields) != set(_PARAM_TYPES):
            raise ValueError(f"fields must be exactly {sorted(_PARAM_TYPES)}")
        for name, kind in _PARAM_TYPES.items():
            value = fields[name]
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else (
                isinstance(value, kind) and (kind is bool or not isinstance(value, bool)))
            if not ok:
                raise ValueError(f"{name} must be {kind.__name__}")
        if not all(type(s) is int for s in fields["site_ids"]):
            raise ValueError("site_ids must be integers")
        fields["round_id"] = bytes.fromhex(fields["round_id"])
        fields["members_digest"] = bytes.fromhex(fields["members_digest"])
        fields["site_ids"] = tuple(fields["site_ids"])
        return SecAggParams(**fields)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ParameterError(f"malformed secure-aggregation parameters: {exc}") from exc


def site_weight(declared: int | None, settings: SecureAggSettings) -> int:
    """w: the site's declared weight capped at W, or W itself (equal weights) when it declares none."""
    return settings.max_examples if declared is None else min(declared, settings.max_examples)


def encode_contribution(delta: np.ndarray, weight: int, settings: SecureAggSettings) -> tuple[np.ndarray, bool]:
    """(values, clipped?): the site's masked-vector contents, for a weight from :func:`site_weight`."""
    if not 1 <= weight <= settings.max_examples:
        raise ValueError(f"weight {weight} is outside [1, W={settings.max_examples}]")
    values, clipped = clip_l2(weight / settings.max_examples * delta.astype(np.float64), settings.clip)
    return values, bool(clipped)


@dataclass(frozen=True)
class SecureSum:
    """What the server learns from a secure round: the weighted mean, from sums only."""

    mean_delta: np.ndarray
    total_weight: int
    error_bound: float
    """Per-element bound on |mean_delta − exact weighted mean of the clipped updates|."""
    clamped_elements: int
    """Elements of the sum outside the range honest inputs can reach (a hostile input), clamped into it."""
    mean_clipped: bool = False
    """The mean's L2 norm exceeded what honest inputs can reach (a hostile input): scaled down to it."""


def honest_mean_norm(settings: SecureAggSettings, contributors: int, total_weight: int) -> float:
    """The largest L2 norm honest inputs give the weighted mean: each contribution has ‖u‖ ≤ C
    (:func:`encode_contribution`), so ‖Σu‖ ≤ s·C and ‖W·Σu/Σw‖ ≤ W·s·C/Σw (C with equal weights)."""
    return settings.max_examples * contributors * settings.clip / total_weight


def bounded_mean(contribution_sum: np.ndarray, settings: SecureAggSettings, contributors: int, total_weight: int,
                 slack: float = 0.0) -> tuple[np.ndarray, bool]:
    """(W·Σu/Σw with its L2 norm bounded by :func:`honest_mean_norm` + ``slack``, was it scaled down?).

    Secure aggregation hides inputs; it does not check them. A site that skips the encoder can upload
    any in-ring vector, and per element the sum still looks possible (n in-range inputs reach ±n·C),
    so one site could steer the mean to a pattern of its choice with a norm growing as n·√L. Bounding
    the mean's norm to what honest inputs can reach leaves it at most 2·honest_mean_norm of influence:
    s times what one in-range input has (2·C·W/Σw), independent of L."""
    if total_weight <= 0:
        raise ValueError("the survivors carry no weight")
    mean = contribution_sum.astype(np.float64) * (settings.max_examples / total_weight)
    bounded, clipped = clip_l2(mean, honest_mean_norm(settings, contributors, total_weight) + slack)
    return bounded.astype(np.float32), clipped


def decode_sum(result: AggregateResult, settings: SecureAggSettings, params: SecAggParams,
               total_weight: int) -> SecureSum:
    """The weighted mean from the survivors' sum and their public weights' total, its norm bounded
    (:func:`bounded_mean`; the fixed-point error of every element is slack)."""
    if total_weight <= 0:
        raise ValueError("the survivors carry no weight")
    scale = settings.max_examples / total_weight
    bound = error_bound(len(result.survivors), params.value_bits, params.clip, params.rounding) * scale
    mean, clipped = bounded_mean(result.sum_vector, settings, len(result.survivors), total_weight,
                                 slack=bound * math.sqrt(params.vector_length))
    if clipped:
        log.warning("the decoded mean's L2 norm exceeded what honest inputs reach (a hostile input): scaled down")
    return SecureSum(mean_delta=mean, total_weight=int(total_weight), error_bound=float(bound),
                     clamped_elements=result.clamped, mean_clipped=clipped)
