"""The noise-analysis bound: never below the exact Rényi DP of the sampled Gaussian, and σ meets its target."""

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp

from simulations.benchmarks.noise_analysis import ORDERS, general_epsilon, general_sigma, general_subsampled_rdp, main


@pytest.mark.parametrize(("sigma", "q"), [(0.8, 0.05), (1.5, 0.25), (3.0, 0.5)])
def test_the_general_bound_is_never_below_the_sampled_gaussians_exact_rdp(sigma, q):
    exact = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS))
    bound = general_subsampled_rdp(sigma, q)
    assert np.all(bound >= exact * (1 - 1e-9))
    assert bound[0] == pytest.approx(exact[0], rel=1e-9)  # at α = 2 there is no l >= 3 term: the bound is exact


def test_the_general_sigma_is_the_smallest_within_the_budget():
    sigma = general_sigma(8.0, 0.25, 120, 1e-5)
    assert general_epsilon(sigma, 0.25, 120, 1e-5) <= 8.0 < general_epsilon(sigma / 1.01, 0.25, 120, 1e-5)


@pytest.mark.parametrize("rate", ["0", "1", "1.5"])
def test_a_sample_rate_outside_zero_to_one_is_refused(rate):
    with pytest.raises(SystemExit, match="sample-rate must be in"):
        main(["--sample-rate", rate])
