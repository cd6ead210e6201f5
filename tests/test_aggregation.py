"""Aggregation arithmetic, checked by hand: weighted means, deltas, and why FFA-LoRA is exact."""

import numpy as np

from common.adapter import apply_delta, delta, flatten, trainable_keys, unflatten
from server.strategy import weighted_mean


def test_weighted_mean_by_hand():
    # Prepare: two sites, 1 and 3 examples.  Execute.  Assert: (1*[0,4] + 3*[4,0]) / 4 = [3, 1].
    mean = weighted_mean([np.array([0, 4], np.float32), np.array([4, 0], np.float32)], [1, 3])
    np.testing.assert_array_equal(mean, [3, 1])


def test_applying_a_ones_delta_twice_at_zero_start_gives_exactly_two():
    state = {"x.lora_B.weight": np.zeros((2, 2), np.float32), "x.lora_A.weight": np.zeros((2, 2), np.float32)}
    keys = trainable_keys(state, "ffa")
    assert keys == ["x.lora_B.weight"]  # A is frozen under FFA-LoRA and never sent
    for _ in range(2):
        state = apply_delta(state, np.ones(4, np.float32), keys)
    np.testing.assert_array_equal(state["x.lora_B.weight"], 2 * np.ones((2, 2)))
    np.testing.assert_array_equal(state["x.lora_A.weight"], np.zeros((2, 2)))


def test_flatten_unflatten_and_delta_round_trip():
    rng = np.random.default_rng(1)
    before = {k: rng.normal(size=s).astype(np.float32) for k, s in [("b", (3, 2)), ("a", (2,)), ("c", (1, 4))]}
    after = {k: v + 1 for k, v in before.items()}
    keys = trainable_keys(before, "plain")
    assert keys == ["a", "b", "c"]
    np.testing.assert_allclose(delta(after, before, keys), np.ones(12))
    back = unflatten(flatten(before, keys), before, keys)
    assert all(np.array_equal(back[k], before[k]) for k in keys)


def test_ffa_mean_is_exact_and_plain_averaging_is_not():
    rng = np.random.default_rng(2)
    sites, d, r = 4, 16, 4
    shared_a = rng.normal(size=(r, d))
    site_b = [rng.normal(size=(d, r)) for _ in range(sites)]
    site_a = [shared_a + rng.normal(scale=0.5, size=(r, d)) for _ in range(sites)]
    weights = [5, 1, 3, 7]
    exact = sum(w * b @ shared_a for w, b in zip(weights, site_b)) / sum(weights)
    # FFA: A identical everywhere, so mean(B)·A equals the mean of the sites' B·A.
    ffa = weighted_mean([b.ravel().astype(np.float32) for b in site_b], weights).reshape(d, r) @ shared_a
    np.testing.assert_allclose(ffa, exact, rtol=1e-5, atol=1e-5)
    # Plain: sites trained A too; mean(B)·mean(A) differs from mean(B·A).
    wanted = sum(w * b @ a for w, b, a in zip(weights, site_b, site_a)) / sum(weights)
    mean_b = sum(w * b for w, b in zip(weights, site_b)) / sum(weights)
    mean_a = sum(w * a for w, a in zip(weights, site_a)) / sum(weights)
    gap = np.linalg.norm(mean_b @ mean_a - wanted) / np.linalg.norm(wanted)
    assert gap > 0.05
