"""The server's step in distributed DP-SGD (common/distributed_dp.py): decode the sites' secure sum, bound its norm,
divide by the public expected batch, step the server optimizer. All of it is post-processing of the noisy sum: free
in privacy."""

from __future__ import annotations

import logging

import numpy as np

from common.distributed_dp import DistributedDpPlan, Ring, check_participants, decode_sum, mean_gradient
from server.optimizer import ServerOptimizer

log = logging.getLogger(__name__)


def distributed_delta(plan: DistributedDpPlan, ring_sum: Ring, *, seed: int, participants: int,
                      honest_sites: int) -> tuple[np.ndarray, bool]:
    """(Δ = −g, was the sum scaled down?): g the mean gradient (wire order) from the sum mod 2^b of ``participants``
    sites' uploads, each with 1/``honest_sites`` of the noise, for the round of rotation seed ``seed``: what the
    server optimizer steps along (fedavg: x −= η·g, DP-SGD's step; fedadam: Adam on g), as it steps along the sites'
    mean update in local mode. A sum beyond what honest uploads reach is a hostile upload: scaled down, and said."""
    check_participants(plan, participants)
    decoded = decode_sum(plan, ring_sum, seed, participants=participants, honest_sites=honest_sites)
    if decoded.clipped:
        log.warning("the decoded sum's L2 norm exceeded what honest uploads reach (a hostile upload): scaled down")
    return -mean_gradient(plan, decoded.noisy_sum), decoded.clipped


def distributed_update(plan: DistributedDpPlan, ring_sum: Ring, *, seed: int, participants: int, honest_sites: int,
                       optimizer: ServerOptimizer) -> np.ndarray:
    """The change to apply to the global adapter (wire order): the server optimizer's step along
    :func:`distributed_delta`."""
    delta, _ = distributed_delta(plan, ring_sum, seed=seed, participants=participants, honest_sites=honest_sites)
    return optimizer.step(delta)
