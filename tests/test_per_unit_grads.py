"""fedtune's per-unit DP-SGD against Opacus, the reference: per-row gradients of the real adapters (MiniLM
with FFA and plain LoRA, SmolLM2) to 1e-5, and a whole clipped step, per record and per patient."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer

from client.per_unit_grads import LinearCapture, PerUnitDPSGD, UnsupportedLayer, trainable_linears
from client.plan import TrainingPlan
from client.train import Chunk, UnitBatches, forward_loss
from common.config import LoraSettings, TrainSettings
from common.data import label_names, read_records
from common.encoding import encode
from common.model import build_model, load_tokenizer

CASES = [("minilm", "classification", "ffa"), ("minilm", "classification", "plain"), ("smollm2", "causal-lm", "ffa")]


def _chunks(model_name: str, task: str, *, rows: int = 8, patients: bool = False) -> list[Chunk]:
    records = read_records("drugreview", task=task)[:rows]
    if patients:  # rows 0-3 are one patient's
        records = [dict(r, patient="p0" if i < 4 else f"p{i}") for i, r in enumerate(records)]
    labels = label_names(records) if task == "classification" else ()
    data = encode(records, labels, load_tokenizer(model_name), 32, "t", task=task,
                  unit_column="patient" if patients else "")
    plan = TrainingPlan(batch_size=rows, units=data.unit_count, steps=1, learning_rate=1.0, max_grad_norm=1.0)
    return UnitBatches(data, plan, TrainSettings(physical_batch_tokens=4 * 32, max_rows_per_unit=8),
                       poisson=False).chunks(list(range(data.unit_count)))


def _model(model_name: str, task: str, aggregation: str) -> torch.nn.Module:
    model = build_model(model_name, 3 if task == "classification" else 0, LoraSettings(aggregation=aggregation), task)
    model.train()  # Opacus' hooks record only in training mode; dropout off so both see the same forward
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.model
@pytest.mark.parametrize(("model_name", "task", "aggregation"), CASES)
def test_per_row_gradients_equal_opacus_hooks(model_name: str, task: str, aggregation: str) -> None:
    model = _model(model_name, task, aggregation)
    chunk = _chunks(model_name, task)[0]
    capture = LinearCapture(trainable_linears(model))
    with capture.recording():
        loss = forward_loss(model, chunk)
    ours = capture.per_row_gradients(loss, len(chunk.labels))
    reference = prepare_module(model, grad_sample_mode="hooks", batch_first=True, loss_reduction="mean")
    forward_loss(reference, chunk).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(ours) == set(trainable) and len(trainable) >= 12
    for param in trainable:
        assert ours[param].shape == param.grad_sample.shape == (len(chunk.labels), *param.shape)
        torch.testing.assert_close(ours[param], param.grad_sample, rtol=0, atol=1e-5)
    assert max(float(p.grad_sample.abs().max()) for p in trainable) > 1e-3  # gradients, not zeros, were compared
    reference._close()


@pytest.mark.model
@pytest.mark.parametrize("patients", [False, True])
def test_a_clipped_step_equals_opacus_dp_optimizer(patients: bool) -> None:
    """Noise off, C small enough that every unit is clipped: the same step as Opacus' DPOptimizer over the same
    chunks (per patient: the patient's rows summed before clipping, as client.train does for Opacus)."""
    chunks = _chunks("minilm", "classification", patients=patients)
    clip, expected_batch = 0.01, 8
    ours, theirs = _model("minilm", "classification", "ffa"), _model("minilm", "classification", "ffa")
    theirs.load_state_dict(ours.state_dict())
    start = [p.detach().clone() for p in ours.parameters()]
    step = PerUnitDPSGD(ours, torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0),
                        noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=expected_batch,
                        generator=torch.Generator())
    step.step(chunks, lambda chunk: forward_loss(ours, chunk))

    trainable = [p for p in theirs.parameters() if p.requires_grad]
    reference = prepare_module(theirs, grad_sample_mode="hooks", batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(trainable, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=expected_batch, loss_reduction="mean")
    for i, chunk in enumerate(chunks):
        optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
        forward_loss(reference, chunk).backward()
        for param in trainable:  # per unit: the unit's rows added up before Opacus clips
            rows = param.grad_sample
            param.grad_sample = torch.zeros((chunk.units, *rows.shape[1:])).index_add_(0, chunk.unit_of_row, rows)
        optimizer.step()
        if i < len(chunks) - 1:
            optimizer.zero_grad()
    reference._close()
    for mine, other in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(mine, other, rtol=0, atol=1e-7)
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(ours.parameters(), start, strict=True)]).norm()
    units = sum(chunk.units for chunk in chunks)
    assert units == (5 if patients else 8) and 0 < float(moved) <= clip * units / expected_batch * (1 + 1e-4)


def test_the_noise_is_drawn_and_scaled_as_charged() -> None:
    """σ·C noise on the clipped sum, divided by the expected batch: an empty batch moves the weights by noise."""
    model = torch.nn.Linear(64, 64, bias=False)
    torch.nn.init.zeros_(model.weight)
    sigma, clip, batch = 2.0, 0.5, 4
    step = PerUnitDPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma,
                        max_grad_norm=clip, expected_batch_size=batch, generator=torch.Generator().manual_seed(1))
    step.step([], lambda chunk: torch.zeros(()))
    assert float(model.weight.std()) == pytest.approx(sigma * clip / batch, rel=0.05)


def test_trainable_layers_other_than_linear_are_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(UnsupportedLayer, match="LayerNorm"):
        trainable_linears(model)
    with pytest.raises(UnsupportedLayer, match="batch"):  # batch norm mixes rows, frozen or not: never under DP
        PerUnitDPSGD(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4).requires_grad_(False)),
                     torch.optim.SGD([torch.zeros(1)], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=1, generator=torch.Generator())
