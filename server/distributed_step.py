"""The server's step in distributed DP-SGD (common/distributed_dp.py): decode the sites' secure sum, divide by the
public expected batch, step the server optimizer. All of it is post-processing of the noisy sum: free in privacy."""

from __future__ import annotations

import numpy as np

from common.distributed_dp import DistributedDpPlan, Ring, check_participants, decode_sum, mean_gradient
from server.optimizer import ServerOptimizer


def distributed_update(plan: DistributedDpPlan, ring_sum: Ring, *, seed: int, participants: int,
                       optimizer: ServerOptimizer) -> np.ndarray:
    """The change to apply to the global adapter (wire order) from the sum mod 2^b of ``participants`` sites'
    uploads for the round of rotation seed ``seed``. The mean gradient g is a descent direction's opposite: the
    server optimizer steps along Δ = −g (fedavg: x −= η·g, DP-SGD's step; fedadam: Adam on g)."""
    check_participants(plan, participants)
    return optimizer.step(-mean_gradient(plan, decode_sum(plan, ring_sum, seed)))
