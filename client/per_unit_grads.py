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

Per-unit isolation: nothing one unit holds can change what the step does beyond its own clipped
contribution (norm ≤ C), or make the step fail. A unit whose gradient is not finite (a record whose
logits overflow under a hostile adapter) contributes zero, decided per unit, never per pass; a pass that
raises (out of memory, ...) is retried unit by unit, and a unit that still raises contributes zero. Both
are logged at the site only. Gradients, norms, clip factors and noise are fp32 whatever the base's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

import torch
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger("fedtune.client")


Rows = TypeVar("Rows", bound="RowBatch")


class RowBatch(Protocol):
    """One forward pass's rows: ``labels`` has a row each; ``unit_of_row`` maps rows to ``units`` units."""

    @property
    def labels(self) -> torch.Tensor: ...
    @property
    def unit_of_row(self) -> torch.Tensor: ...
    @property
    def units(self) -> int: ...
    def each_unit(self: Rows) -> list[Rows]:
        """The same rows as one pass per unit."""
        ...


class UnsupportedLayer(ValueError):
    """A model whose per-unit gradients are not computed here: a trainable parameter outside a linear layer,
    or not fp32, or a layer whose inputs are not batch-first."""


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
        """Each row's gradient of every trainable parameter, [rows, *shape] in fp32, for ``loss`` = the mean over
        rows of each row's own loss (hence the factor ``rows``). A layer called twice adds both calls up.

        Attributing a layer's input to rows needs batch-first tensors ([rows, features] or [rows, tokens,
        features]); any other layout is refused (UnsupportedLayer), never silently reshaped."""
        calls, self.calls = self.calls, []
        backprops = torch.autograd.grad(loss, [output for _, _, output in calls])
        grads: dict[torch.nn.Parameter, torch.Tensor] = {}
        for (layer, inputs, output), backprop in zip(calls, backprops, strict=True):
            _check_batch_first(layer, inputs, output, rows)
            g = backprop.float().reshape(rows, -1, backprop.shape[-1]) * rows
            x = inputs.float().reshape(rows, -1, inputs.shape[-1])
            parts = []
            if layer.weight.requires_grad:
                parts.append((layer.weight, torch.einsum("bto,bti->boi", g, x)))
            if layer.bias is not None and layer.bias.requires_grad:
                parts.append((layer.bias, g.sum(1)))
            for param, grad in parts:
                grads[param] = grads[param] + grad if param in grads else grad
        return grads


def _check_batch_first(layer: torch.nn.Linear, inputs: torch.Tensor, output: torch.Tensor, rows: int) -> None:
    if not (inputs.dim() in (2, 3) and inputs.shape[0] == rows and output.shape[:-1] == inputs.shape[:-1]):
        raise UnsupportedLayer(f"{layer} saw an input of shape {tuple(inputs.shape)} (output {tuple(output.shape)}) "
                               f"in a pass of {rows} rows: per-unit gradients need batch-first inputs [rows, "
                               "features] or [rows, tokens, features], so this model's layout cannot be attributed "
                               "to rows; use a batch-first model")


def clipped_units(grads: dict[torch.nn.Parameter, torch.Tensor], unit_of_row: torch.Tensor, units: int,
                  max_grad_norm: float) -> tuple[dict[torch.nn.Parameter, torch.Tensor], int]:
    """(each unit's gradient (its rows added up), clipped to ``max_grad_norm``, [units, *shape] in fp32; how many
    units contributed zero because their gradient's norm is not finite)."""
    per_unit = {}
    for param, grad in grads.items():  # fp32, from per_row_gradients
        if units == grad.shape[0]:
            per_unit[param] = grad  # one row per unit: nothing to add up
        else:
            per_unit[param] = torch.zeros((units, *grad.shape[1:]), dtype=grad.dtype, device=grad.device
                                          ).index_add_(0, unit_of_row.to(grad.device), grad)
    norms = torch.stack([g.reshape(units, -1).norm(2, dim=1) for g in per_unit.values()], dim=1).norm(2, dim=1)
    finite = torch.isfinite(norms)  # NaN or inf anywhere in a unit's gradient makes its norm so
    factor = torch.where(finite, (max_grad_norm / (norms + 1e-6)).clamp(max=1.0), 0.0)
    clipped = {param: g.masked_fill(~finite.view(-1, *[1] * (g.dim() - 1)), 0) * factor.view(-1, *[1] * (g.dim() - 1))
               for param, g in per_unit.items()}
    return clipped, int((~finite).sum())


class PerUnitClipping:
    """Each unit's clipped gradient of a model's trainable linear layers, pass by pass, a unit's failure its own."""

    def __init__(self, model: torch.nn.Module, *, max_grad_norm: float) -> None:
        refuse_row_mixing(model)
        self.capture = LinearCapture(trainable_linears(model))
        self.params = [p for layer in self.capture.layers for p in layer.parameters(recurse=False)
                       if p.requires_grad]
        wide = [tuple(p.shape) for p in self.params if p.dtype != torch.float32]
        if wide:
            raise UnsupportedLayer(f"trainable parameters of shapes {wide[:3]} are not fp32: the DP step adds fp32 "
                                   "gradients and noise to them; build the model with common.model.build_model, "
                                   "which trains every layer in fp32")
        self.clip = max_grad_norm
        self.zeroed_units = 0
        """Units that contributed zero so far (a gradient not finite, or a pass that raised on them alone)."""

    def check_trains(self, probe: Rows, loss_of: Callable[[Rows], torch.Tensor]) -> None:
        """One pass on public rows, exceptions uncaught: a model or code that cannot train at all fails loudly
        here, before any unit's pass, so a step never takes a bug for a unit's failure and trains on noise."""
        self._clipped(probe, loss_of)

    def _clipped(self, chunk: Rows, loss_of: Callable[[Rows], torch.Tensor]
                 ) -> tuple[dict[torch.nn.Parameter, torch.Tensor], int]:
        try:
            with self.capture.recording():
                loss = loss_of(chunk)
            grads = self.capture.per_row_gradients(loss, len(chunk.labels))
        finally:
            self.capture.calls = []  # the pass's graph, also when it raised
        return clipped_units(grads, chunk.unit_of_row, chunk.units, self.clip)

    def _contained(self, chunk: Rows, loss_of: Callable[[Rows], torch.Tensor]
                   ) -> dict[torch.nn.Parameter, torch.Tensor] | None:
        """The chunk's clipped units, or None when its pass raised."""
        try:
            clipped, zeroed = self._clipped(chunk, loss_of)
        except UnsupportedLayer:
            raise  # the model's layout, the same for every unit
        except Exception as exc:  # which exception one unit's rows raise must not reach the reply
            log.warning("a pass of %d unit(s) raised %s: %s", chunk.units, type(exc).__name__, exc)
            return None
        if zeroed:
            log.warning("%d unit(s) had a gradient that is not finite: each contributed zero to this step", zeroed)
            self.zeroed_units += zeroed
        return clipped

    def each_pass(self, chunks: Sequence[Rows], loss_of: Callable[[Rows], torch.Tensor]
                  ) -> Iterator[dict[torch.nn.Parameter, torch.Tensor]]:
        """Each pass's units' clipped gradients ({param: [units, *shape]}); a pass that raises is retried unit by
        unit, and a unit that still raises contributes zero (it is left out)."""
        for chunk in chunks:
            passes = [chunk]
            while passes:
                current = passes.pop()
                clipped = self._contained(current, loss_of)  # returned outside ``except``: the failed pass is freed
                if clipped is None and current.units > 1:
                    passes.extend(current.each_unit())
                elif clipped is None:
                    self.zeroed_units += 1
                    log.warning("a unit's pass raised on its own: it contributed zero to this step")
                else:
                    yield clipped


class PerUnitDPSGD(PerUnitClipping):
    """DP-SGD steps over a model's trainable linear layers: clip per unit, sum over a logical batch's chunks,
    add Gaussian noise once, divide by the expected batch, step the wrapped optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, generator: torch.Generator) -> None:
        super().__init__(model, max_grad_norm=max_grad_norm)
        self.optimizer, self.sigma = optimizer, noise_multiplier
        self.expected_batch_size, self.generator = expected_batch_size, generator

    def step(self, chunks: Sequence[Rows], loss_of: Callable[[Rows], torch.Tensor],
             canaries: Sequence[tuple[torch.nn.Parameter, int]] = ()) -> None:
        """One noised step over a logical batch (an empty batch still adds the noise: the step was charged).

        ``canaries``: the privacy audit's gradient canaries that joined this batch (client/canaries.py), each
        (parameter, flat index) one more unit whose clipped gradient is C·e_j, added before the noise."""
        summed = {p: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params}
        for param, index in canaries:
            summed[param].view(-1)[index] += self.clip
        for clipped in self.each_pass(chunks, loss_of):
            for param, grad in clipped.items():
                summed[param] += grad.sum(0)
        for param in self.params:
            noise = torch.normal(0.0, self.sigma * self.clip, param.shape, generator=self.generator,
                                 device=param.device, dtype=torch.float32)
            param.grad = (summed[param] + noise) / self.expected_batch_size
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
