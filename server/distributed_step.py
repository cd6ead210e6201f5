"""The server's step in distributed DP-SGD (common/distributed_dp.py): decode the sites' secure sum, divide by the
public expected batch, step the server optimizer. All of it is post-processing of the noisy sum: free in privacy."""

from __future__ import annotations

import numpy as np

from common.distributed_dp import DistributedDpPlan, Ring, check_participants, decode_sum, mean_gradient
from server.optimizer import ServerOptimizer


def distributed_delta(plan: DistributedDpPlan, ring_sum: Ring, *, seed: int, participants: int) -> np.ndarray:
    """Δ = −g, g the mean gradient (wire order) from the sum mod 2^b of ``participants`` sites' uploads for the round
    of rotation seed ``seed``: what the server optimizer steps along (fedavg: x −= η·g, DP-SGD's step; fedadam: Adam
    on g), as it steps along the sites' mean update in local mode."""
    check_participants(plan, participants)
    return -mean_gradient(plan, decode_sum(plan, ring_sum, seed))


def distributed_update(plan: DistributedDpPlan, ring_sum: Ring, *, seed: int, participants: int,
                       optimizer: ServerOptimizer) -> np.ndarray:
    """The change to apply to the global adapter (wire order): the server optimizer's step along
    :func:`distributed_delta`."""
    return optimizer.step(distributed_delta(plan, ring_sum, seed=seed, participants=participants))
