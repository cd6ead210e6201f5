"""Per-unit gradients of an adapter's linear layers from one backward pass, and the DP-SGD step on them.

Everything a site trains is the weight (and bias) of a linear layer: LoRA's B (and A, when A is not
frozen) and a classifier's head. For y = x Wᵀ + b applied to the tokens of row i, row i's gradient is
Σ_t g_{i,t} ⊗ x_{i,t} (and Σ_t g_{i,t}), where x is the layer's input and g the loss gradient at its
output. For LoRA's B the input is A·x, of rank r: a row's gradient is an out × r matrix, so it costs
almost nothing to form exactly. The backward pass computes only the gradients at the adapted layers'
outputs (``torch.autograd.grad``), never the parameters' batch gradients, which DP-SGD discards anyway.

The step is DP-SGD as the ledger charges it: rows of one unit are added up, each unit's gradient is
clipped to C (factor min(1, C / (‖g‖ + 1e-6)), as Opacus), the clipped sum gets N(0, σ²C²) noise from
OS entropy, and is divided by the expected batch size. tests/test_per_unit_grads.py checks the per-row
gradients against Opacus' hooks and the step against Opacus' DPOptimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

import torch
from torch.nn.modules.batchnorm import _BatchNorm


class RowBatch(Protocol):
    """One forward pass's rows: ``labels`` has a row each; ``unit_of_row`` maps rows to ``units`` units."""

    @property
    def labels(self) -> torch.Tensor: ...
    @property
    def unit_of_row(self) -> torch.Tensor: ...
    @property
    def units(self) -> int: ...


Rows = TypeVar("Rows", bound=RowBatch)


class UnsupportedLayer(ValueError):
    """A trainable parameter outside a linear layer: its per-unit gradient is not computed here."""


def refuse_row_mixing(model: torch.nn.Module) -> None:
    """A batch norm in training mode makes each row's output depend on the other rows of its batch, so
    clipping per row would not bound one row's influence: refused, trainable or frozen (Opacus checks only
    trainable layers)."""
    mixing = [name for name, module in model.named_modules() if isinstance(module, _BatchNorm) and module.training]
    if mixing:
        raise UnsupportedLayer(f"{mixing[:3]} normalise over the batch in training mode, which DP-SGD cannot "
                               "bound per unit; use a model with layer or group norm")


def trainable_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers holding every trainable parameter (refusing any other trainable parameter)."""
    layers: list[torch.nn.Linear] = []
    covered: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise UnsupportedLayer(f"{name} ({type(module).__name__}) has trainable parameters; per-unit "
                                   "gradients are computed for linear layers only (LoRA and classifier heads)")
        layers.append(module)
        covered.update(id(p) for p in own)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise UnsupportedLayer(f"trainable parameters outside any layer: {missing[:3]}")
    return layers


class LinearCapture:
    """Records the input and the output of each trainable linear layer during a forward pass."""

    def __init__(self, layers: list[torch.nn.Linear]) -> None:
        self.layers = layers
        self.calls: list[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]] = []

    @contextmanager
    def recording(self) -> Iterator[LinearCapture]:
        def keep(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if torch.is_grad_enabled():
                assert isinstance(module, torch.nn.Linear)
                self.calls.append((module, inputs[0].detach(), output))

        handles = [layer.register_forward_hook(keep) for layer in self.layers]
        self.calls = []
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def per_row_gradients(self, loss: torch.Tensor, rows: int) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Each row's gradient of every trainable parameter, [rows, *shape], for ``loss`` = the mean over rows
        of each row's own loss (hence the factor ``rows``). A layer called twice adds both calls up."""
        outputs = [output for _, _, output in self.calls]
        backprops = torch.autograd.grad(loss, outputs)
        grads: dict[torch.nn.Parameter, torch.Tensor] = {}
        for (layer, inputs, _), backprop in zip(self.calls, backprops, strict=True):
            g = backprop.reshape(rows, -1, backprop.shape[-1]) * rows
            x = inputs.reshape(rows, -1, inputs.shape[-1])
            parts = []
            if layer.weight.requires_grad:
                parts.append((layer.weight, torch.einsum("bto,bti->boi", g, x)))
            if layer.bias is not None and layer.bias.requires_grad:
                parts.append((layer.bias, g.sum(1)))
            for param, grad in parts:
                grads[param] = grads[param] + grad if param in grads else grad
        self.calls = []
        return grads


def clipped_unit_sum(grads: dict[torch.nn.Parameter, torch.Tensor], unit_of_row: torch.Tensor, units: int,
                     max_grad_norm: float) -> dict[torch.nn.Parameter, torch.Tensor]:
    """The sum over units of each unit's gradient (its rows added up), clipped to ``max_grad_norm``."""
    per_unit = {}
    for param, grad in grads.items():
        if units == grad.shape[0]:
            per_unit[param] = grad  # one row per unit: nothing to add up
        else:
            per_unit[param] = torch.zeros((units, *grad.shape[1:]), dtype=grad.dtype, device=grad.device
                                          ).index_add_(0, unit_of_row.to(grad.device), grad)
    norms = torch.stack([g.reshape(units, -1).norm(2, dim=1) for g in per_unit.values()], dim=1).norm(2, dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {param: torch.einsum("u,u...->...", factor, g) for param, g in per_unit.items()}


class PerUnitDPSGD:
    """DP-SGD steps over a model's trainable linear layers: clip per unit, sum over a logical batch's chunks,
    add Gaussian noise once, divide by the expected batch, step the wrapped optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, generator: torch.Generator) -> None:
        refuse_row_mixing(model)
        self.capture = LinearCapture(trainable_linears(model))
        self.params = [p for layer in self.capture.layers for p in layer.parameters(recurse=False)
                       if p.requires_grad]
        self.optimizer, self.sigma, self.clip = optimizer, noise_multiplier, max_grad_norm
        self.expected_batch_size, self.generator = expected_batch_size, generator

    def step(self, chunks: Sequence[Rows], loss_of: Callable[[Rows], torch.Tensor]) -> None:
        """One noised step over a logical batch (an empty batch still adds the noise: the step was charged)."""
        summed = {p: torch.zeros_like(p) for p in self.params}
        for chunk in chunks:
            with self.capture.recording():
                loss = loss_of(chunk)
            grads = self.capture.per_row_gradients(loss, len(chunk.labels))
            for param, grad in clipped_unit_sum(grads, chunk.unit_of_row, chunk.units, self.clip).items():
                summed[param] += grad
        for param in self.params:
            noise = torch.normal(0.0, self.sigma * self.clip, param.shape, generator=self.generator,
                                 device=param.device, dtype=param.dtype)
            param.grad = (summed[param] + noise) / self.expected_batch_size
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
