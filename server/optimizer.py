"""The server's step on the sites' mean update (Reddi et al., 2021, "Adaptive Federated Optimization").

The mean of the sites' DP updates is a DP release; whatever the server computes from it is
post-processing and costs no privacy. The mean update Δ is treated as a pseudo-gradient:

    fedavg    x += η·Δ
    fedavgm   m = β₁·m + Δ;                                  x += η·m
    fedadam   m = β₁·m + (1−β₁)·Δ;  v = β₂·v + (1−β₂)·Δ²;     x += η·m/(√v + τ)
    fedyogi   m as fedadam;         v = v − (1−β₂)·Δ²·sign(v − Δ²)
    adam      m, v as fedadam with Adam's β₂ = 0.999;  x += η·m̂/(√v̂ + 1e-8), m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)

``adam`` is Kingma & Ba's (2015) bias-corrected Adam, the sites' local optimizer (torch's AdamW, without its
weight decay): the one for distributed DP, where the server's step IS the DP-SGD step on the noisy mean gradient.
FedAdam's missing bias correction makes its early steps about 1/√(1−β₂ᵗ) too large: 30× at t = 1, 3× at t = 120.

Its state (m, v; adam: and t) is saved with every checkpoint, so a resumed run continues the same trajectory.
"""

from __future__ import annotations

import numpy as np

from common.config import ServerSettings

ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-8
"""``adam``'s β₂ and ε: torch.optim.AdamW's defaults, as the sites' local steps use them."""


class ServerOptimizer:
    def __init__(self, settings: ServerSettings, size: int, state: dict[str, np.ndarray] | None = None) -> None:
        self.settings = settings
        self.m = np.zeros(size, dtype=np.float64)
        self.v = np.zeros(size, dtype=np.float64)
        self.t = 0
        if state:
            keys = {"m", "v", "t"} if settings.optimizer == "adam" else {"m", "v"}
            if set(state) != keys or any(state[key].shape != (size,) for key in ("m", "v")):
                raise ValueError("the saved server optimizer state does not match this adapter and optimizer")
            self.m, self.v = state["m"].astype(np.float64), state["v"].astype(np.float64)
            self.t = int(state["t"][0]) if "t" in state else 0

    def step(self, mean_delta: np.ndarray) -> np.ndarray:
        """The change to apply to the global adapter, given the sites' mean update."""
        s, delta = self.settings, mean_delta.astype(np.float64)
        if s.optimizer == "fedavg":
            step = delta
        elif s.optimizer == "fedavgm":
            self.m = s.momentum * self.m + delta
            step = self.m
        elif s.optimizer == "adam":
            self.t += 1
            self.m = s.momentum * self.m + (1 - s.momentum) * delta
            self.v = ADAM_BETA2 * self.v + (1 - ADAM_BETA2) * delta * delta
            corrected_v = self.v / (1 - ADAM_BETA2**self.t)
            step = self.m / (1 - s.momentum**self.t) / (np.sqrt(corrected_v) + ADAM_EPSILON)
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
        """What a checkpoint keeps for a resume (fedavg has no state: empty)."""
        if self.settings.optimizer == "fedavg":
            return {}
        steps = {"t": np.array([self.t], dtype=np.int64)} if self.settings.optimizer == "adam" else {}
        return {"m": self.m.copy(), "v": self.v.copy()} | steps
