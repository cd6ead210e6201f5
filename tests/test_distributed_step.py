"""Distributed DP-SGD on the real MiniLM + FFA-LoRA (tiny sizes): sites' uploads, the server's step, the bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.distributed_step import distributed_contribution, wire_layout
from client.per_unit_grads import PerUnitClipping
from client.plan import TrainingPlan
from client.train import UnitBatches, forward_loss
from common.adapter import apply_delta, flatten, get_adapter_state, set_adapter_state, trainable_keys
from common.config import LoraSettings, ServerSettings, TrainSettings
from common.data import label_names
from common.distributed_dp import (
    DistributedDpSettings,
    encode_units,
    plan_distributed_dp,
    rotation_seed,
)
from common.encoding import encode
from common.model import initial_model, load_tokenizer
from server.distributed_step import distributed_update
from server.optimizer import ServerOptimizer

CHUNKS = TrainSettings(physical_batch_tokens=8 * 32, max_rows_per_unit=4)


@pytest.fixture()
def three_sites(drug_reviews):
    labels = label_names(drug_reviews[:36])
    tokenizer = load_tokenizer("")
    sites = [encode(drug_reviews[12 * i:12 * (i + 1)], labels, tokenizer, 32, f"site {i}") for i in range(3)]
    return sites, labels


def _loss(model, sites) -> float:
    model.eval()
    with torch.no_grad():
        batches = [UnitBatches(site, TrainingPlan(1, site.unit_count, 1, 0.0, 1.0), CHUNKS, poisson=True)
                   for site in sites]
        losses = [float(forward_loss(model, chunk)) for b, site in zip(batches, sites, strict=True)
                  for chunk in b.chunks(list(range(site.unit_count)))]
    return float(np.mean(losses))


@pytest.mark.model
def test_distributed_rounds_reduce_the_loss(three_sites):
    # Prepare: the round-0 model, its wire layout, a plan for 3 sites (all honest) at an ε so loose that the noise is
    # negligible: what is tested is the pipeline (encode, ring sum, decode, step), not DP's utility. At a real ε, 36
    # records against ~75,000 noisy coordinates make a few steps' loss move either way (tests/test_distributed_dp.py
    # checks the noise itself).
    sites, labels = three_sites
    lora = LoraSettings()
    model = initial_model("", labels, lora)
    state = get_adapter_state(model)
    keys = trainable_keys(state, lora.aggregation)
    assert sum(param.numel() for param, _ in wire_layout(model, keys)) == flatten(state, keys).size
    rounds, units = 6, sum(site.unit_count for site in sites)
    plan = plan_distributed_dp(DistributedDpSettings(
        dimension=flatten(state, keys).size, clip=1.0, sample_rate=0.5, steps=rounds, epsilon=1e4, delta=1e-5,
        sites=3, min_honest_sites=3, expected_batch=0.5 * units))
    server = ServerOptimizer(ServerSettings(optimizer="fedavg", learning_rate=2.0),
                             flatten(state, keys).size)
    before = _loss(model, sites)
    # Execute: each round, every site uploads mod 2^b, the secure sum adds them, the server steps
    for server_round in range(1, rounds + 1):
        seed = rotation_seed(0, server_round)
        ring_sum = np.zeros(plan.padded_dimension, dtype=np.uint64)
        for site in sites:
            set_adapter_state(model, state)
            upload = distributed_contribution(model, site, plan, keys=keys, seed=seed, settings=CHUNKS)
            assert upload.dtype == np.uint64 and int(upload.max()) < 1 << plan.ring_bits
            ring_sum = (ring_sum + upload) & np.uint64((1 << plan.ring_bits) - 1)
        state = apply_delta(state, distributed_update(plan, ring_sum, seed=seed, participants=3, honest_sites=3,
                                                            optimizer=server),
                            keys)
    set_adapter_state(model, state)
    # Assert: the pooled step learned
    assert _loss(model, sites) < before - 0.05


@pytest.mark.model
def test_each_units_integer_contribution_is_within_the_bound_on_real_gradients(three_sites):
    sites, labels = three_sites
    lora = LoraSettings()
    model = initial_model("", labels, lora)
    keys = trainable_keys(get_adapter_state(model), lora.aggregation)
    layout = wire_layout(model, keys)
    dimension = sum(param.numel() for param, _ in layout)
    plan = plan_distributed_dp(DistributedDpSettings(dimension=dimension, clip=1e-2, sample_rate=0.5, steps=10,
                                                     epsilon=8.0, delta=1e-5, sites=3, min_honest_sites=2,
                                                     expected_batch=18.0))
    clipping = PerUnitClipping(model, max_grad_norm=plan.settings.clip)
    batches = UnitBatches(sites[0], TrainingPlan(1, sites[0].unit_count, 1, 0.0, 1.0), CHUNKS, poisson=True)
    seed, checked = rotation_seed(1, 1), 0
    for clipped in clipping.each_pass(batches.chunks(list(range(sites[0].unit_count))),
                                      lambda chunk: forward_loss(model, chunk)):
        units = next(iter(clipped.values())).shape[0]
        flat = torch.cat([clipped[param].reshape(units, -1) for param, _ in layout], dim=1).double().numpy()
        norms = np.linalg.norm(flat, axis=1)
        assert (norms <= plan.settings.clip).all() and (norms > 0.99 * plan.settings.clip).all()  # all clipped
        for unit in flat:
            assert np.linalg.norm(encode_units(plan, unit[None, :], seed)) <= plan.unit_l2_bound
            checked += 1
    assert checked == sites[0].unit_count


@pytest.mark.model
def test_a_causal_lm_site_per_person_uploads_its_peoples_clipped_gradient_sum():
    """Generative LLMs, per person: SmolLM2 + LoRA, 3 people of 2 answers each. Every person drawn (q = 1) and the
    noise negligible, the server's decoded sum is the people's clipped gradient sum, up to the rounding."""
    from common.data import read_records
    from common.distributed_dp import decode_sum, site_share

    tokenizer = load_tokenizer("smollm2")
    answers = read_records("drugreview", task="causal-lm")[:6]
    records = [row | {"patient": f"p{i // 2}"} for i, row in enumerate(answers)]
    data = encode(records, (), tokenizer, 24, "site", task="causal-lm", unit_column="patient")
    assert data.unit_count == 3
    lora = LoraSettings()
    model = initial_model("smollm2", (), lora, "causal-lm")
    keys = trainable_keys(get_adapter_state(model), lora.aggregation)
    layout = wire_layout(model, keys)
    public = plan_distributed_dp(DistributedDpSettings(
        dimension=sum(param.numel() for param, _ in layout), clip=1.0, sample_rate=1.0, steps=1, epsilon=1e6,
        delta=1e-5, sites=3, min_honest_sites=3, expected_batch=9.0))
    plan, seed = site_share(public, 3), rotation_seed(7, 1)
    upload = distributed_contribution(model, data, plan, keys=keys, seed=seed, settings=CHUNKS)
    decoded = decode_sum(plan, upload, seed, participants=1, honest_sites=3).noisy_sum
    clipping = PerUnitClipping(model, max_grad_norm=1.0)  # the same people's clipped gradients, in the clear
    batches = UnitBatches(data, TrainingPlan(1, data.unit_count, 1, 0.0, 1.0), CHUNKS, poisson=True)
    exact = np.zeros_like(decoded)
    for clipped in clipping.each_pass(batches.chunks([0, 1, 2]), lambda chunk: forward_loss(model, chunk)):
        units = next(iter(clipped.values())).shape[0]
        exact += torch.cat([clipped[param].reshape(units, -1) for param, _ in layout], dim=1).double().sum(0).numpy()
    assert 1.0 < np.linalg.norm(exact) <= 3.0 + 1e-6  # three people, each clipped to C = 1 (not all aligned)
    # The difference is the noise share and the rounding only: unbiased, independent of the gradients, and of the
    # norm they predict (d coordinates of variance between μ/h and μ/h + 1/4, over γ²; a chi-square with ~10^5
    # degrees of freedom stays within 10 % of its mean with overwhelming probability).
    error, direction = decoded - exact, exact / np.linalg.norm(exact)
    noise_only, with_rounding = (decoded.size * (plan.site_variance + r) / plan.scale**2 for r in (0.0, 0.25))
    assert 0.9 * noise_only <= error @ error <= 1.1 * with_rounding
    assert abs(error @ direction) < 0.1  # ~N(0, ‖error‖²/d): the sum itself came through, every coordinate in place


def test_the_coordinator_bounds_a_hostile_ring_sum_and_clamps_its_counts():
    """What the server decodes from a ring round (server.secure_agg): a sum beyond what honest uploads reach is
    scaled down and said (mean_clipped); an evaluation count beyond what the contributors' counts can reach is
    clamped and counted (clamped_elements)."""
    from common.distributed_dp import site_contribution, sum_norm_bound, to_ring
    from common.distributed_round import with_count_slots
    from common.secure_update import MAX_COUNT
    from server.secure_agg import SecureAggregation

    plan = with_count_slots(plan_distributed_dp(DistributedDpSettings(
        dimension=2000, clip=1.0, sample_rate=0.05, steps=100, epsilon=8.0, delta=1e-5, sites=3, min_honest_sites=3,
        expected_batch=10.0)), sites=3, count_slots=2)
    seed, modulus = rotation_seed(9, 4), np.uint64((1 << plan.ring_bits) - 1)
    units = np.random.default_rng(6).normal(size=(9, 2000)) * 0.05
    honest = np.zeros(plan.padded_dimension + 2, dtype=np.uint64)
    for part in np.array_split(units, 3):
        upload = np.concatenate([site_contribution(plan, part, seed), np.asarray([5, 7], dtype=np.uint64)])
        honest = (honest + upload) & modulus
    hostile = np.concatenate([to_ring(np.full(plan.padded_dimension, 1 << (plan.ring_bits - 3)), plan.ring_bits),
                              np.asarray([0, (1 << plan.ring_bits) - 22], dtype=np.uint64)])  # count sum 2^b − 1
    total, counts = SecureAggregation._distributed_sum(plan, honest, 9, 4, 3, 3)
    assert not total.mean_clipped and total.clamped_elements == 0 and counts == [15, 21]
    total, counts = SecureAggregation._distributed_sum(plan, (honest + hostile) & modulus, 9, 4, 3, 3)
    assert total.mean_clipped and total.clamped_elements == 1 and counts == [15, 3 * MAX_COUNT]
    bound = sum_norm_bound(plan, participants=3, honest_sites=3) / (plan.scale * plan.settings.expected_batch)
    assert float(np.linalg.norm(total.mean_delta)) <= bound * (1 + 1e-6)
