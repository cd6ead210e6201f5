"""The server's step on the sites' mean update (Reddi et al., 2021, "Adaptive Federated Optimization").

The mean of the sites' DP updates is a DP release; whatever the server computes from it is
post-processing and costs no privacy. The mean update Δ is treated as a pseudo-gradient:

    fedavg    x += η·Δ
    fedavgm   m = β₁·m + Δ;                                  x += η·m
    fedadam   m = β₁·m + (1−β₁)·Δ;  v = β₂·v + (1−β₂)·Δ²;     x += η·m/(√v + τ)
    fedyogi   m as fedadam;         v = v − (1−β₂)·Δ²·sign(v − Δ²)

Its state (m, v) is saved with every checkpoint, so a resumed run continues the same trajectory.
"""

from __future__ import annotations

import numpy as np

from common.config import ServerSettings


class ServerOptimizer:
    def __init__(self, settings: ServerSettings, size: int, state: dict[str, np.ndarray] | None = None) -> None:
        self.settings = settings
        self.m = np.zeros(size, dtype=np.float64)
        self.v = np.zeros(size, dtype=np.float64)
        if state:
            if set(state) != {"m", "v"} or any(state[key].shape != (size,) for key in ("m", "v")):
                raise ValueError("the saved server optimizer state does not match this adapter")
            self.m, self.v = state["m"].astype(np.float64), state["v"].astype(np.float64)

    def step(self, mean_delta: np.ndarray) -> np.ndarray:
        """The change to apply to the global adapter, given the sites' mean update."""
        s, delta = self.settings, mean_delta.astype(np.float64)
        if s.optimizer == "fedavg":
            step = delta
        elif s.optimizer == "fedavgm":
            self.m = s.momentum * self.m + delta
            step = self.m
        else:
            self.m = s.momentum * self.m + (1 - s.momentum) * delta
            squared = delta * delta
            if s.optimizer == "fedadam":
                self.v = s.beta2 * self.v + (1 - s.beta2) * squared
            else:  # fedyogi
                self.v = self.v - (1 - s.beta2) * squared * np.sign(self.v - squared)
            step = self.m / (np.sqrt(self.v) + s.tau)
        return (s.learning_rate * step).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"m": self.m.copy(), "v": self.v.copy()}
