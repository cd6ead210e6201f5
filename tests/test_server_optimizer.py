"""The server's step on the mean update: FedAvg, momentum, FedAdam, FedYogi, Adam, and its state across a resume."""

import numpy as np
import pytest
import torch

from common.config import ConfigError, ServerSettings
from server.optimizer import ServerOptimizer


def test_fedavg_applies_the_mean_update_scaled_by_the_server_learning_rate():
    delta = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    assert np.array_equal(ServerOptimizer(ServerSettings(), 3).step(delta), delta)
    np.testing.assert_allclose(ServerOptimizer(ServerSettings(learning_rate=0.5), 3).step(delta), delta / 2)


def test_fedavgm_accumulates_momentum():
    opt = ServerOptimizer(ServerSettings(optimizer="fedavgm", momentum=0.9), 2)
    delta = np.array([1.0, -1.0], dtype=np.float32)
    opt.step(delta)
    np.testing.assert_allclose(opt.step(delta), 1.9 * delta, rtol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_match_their_update_rule(name):
    settings = ServerSettings(optimizer=name, learning_rate=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    opt = ServerOptimizer(settings, 2)
    delta = np.array([0.2, -0.01])
    m = 0.1 * delta
    v = 0.01 * delta**2  # both rules agree on the first step from v = 0
    np.testing.assert_allclose(opt.step(delta), 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    second = np.array([-0.1, 0.05])
    m = 0.9 * m + 0.1 * second
    v = 0.99 * v + 0.01 * second**2 if name == "fedadam" else v - 0.01 * second**2 * np.sign(v - second**2)
    np.testing.assert_allclose(opt.step(second), 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)


def test_adam_steps_as_torch_adam_does_on_the_same_gradients():
    """``adam`` is the sites' optimizer (bias-corrected): x += η·Δ must follow torch's Adam on g = −Δ."""
    rng = np.random.default_rng(0)
    gradients = [rng.normal(size=4) * scale for scale in (1.0, 0.01, 3.0, 0.5)]
    weights = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([weights], lr=0.02)  # β = (0.9, 0.999), ε = 1e-8
    ours, x = ServerOptimizer(ServerSettings(optimizer="adam", learning_rate=0.02), 4), np.zeros(4)
    for gradient in gradients:
        weights.grad = torch.from_numpy(gradient)
        reference.step()
        x = x + ours.step(-gradient)
        np.testing.assert_allclose(x, weights.detach().numpy(), rtol=1e-5, atol=1e-7)
    fresh = ServerOptimizer(ServerSettings(optimizer="adam", learning_rate=0.02), 4)
    np.testing.assert_allclose(np.abs(fresh.step(gradients[1])), 0.02, rtol=1e-4)  # step one: η·sign, not 30× it


@pytest.mark.parametrize("name", ["fedadam", "adam"])
def test_state_round_trips_so_a_resumed_run_continues_the_same_trajectory(name):
    settings = ServerSettings(optimizer=name, learning_rate=0.1)
    deltas = [np.random.default_rng(i).normal(size=5) for i in range(3)]
    straight = ServerOptimizer(settings, 5)
    steps = [straight.step(d) for d in deltas]
    first = ServerOptimizer(settings, 5)
    first.step(deltas[0])
    resumed = ServerOptimizer(settings, 5, first.state())
    assert all(np.array_equal(resumed.step(d), s) for d, s in zip(deltas[1:], steps[1:], strict=True))
    with pytest.raises(ValueError, match="does not match this adapter"):
        ServerOptimizer(settings, 6, first.state())


def test_bad_server_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="server.optimizer must be"):
        ServerSettings(optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="server.learning-rate must be > 0"):
        ServerSettings(learning_rate=0)
