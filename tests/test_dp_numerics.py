"""The DP step's numerics whatever the base's dtype (issue 19, finding 8), on the CPU in bf16: what trains is
fp32, one unit's clipped contribution stays within C at every padding width, and a layer whose inputs
cannot be attributed to rows is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.per_unit_grads import LinearCapture, PerUnitDPSGD, UnsupportedLayer, clipped_units, trainable_linears
from client.privacy import PrivacyLedger
from client.train import Chunk, forward_loss, train_locally
from common.adapter import get_adapter_state
from common.config import LoraSettings, PrivacySettings, TrainSettings
from common.data import label_names
from common.encoding import encode
from common.model import Placement, build_model, load_tokenizer

BF16 = Placement(base_dtype=torch.bfloat16)


@pytest.mark.model
def test_a_dp_classifier_trains_on_a_bf16_base(tmp_path: Path, drug_reviews):
    labels = label_names(drug_reviews)
    model = build_model("", len(labels), LoraSettings(), "classification", BF16)
    assert next(p for n, p in model.named_parameters() if "query.base_layer" in n).dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # LoRA and the head
    before = get_adapter_state(model)
    data = encode(drug_reviews[:8], labels, load_tokenizer(""), 16, "t")
    result = train_locally(model, data, TrainSettings(learning_rate=0.02, local_epochs=1, batch_size=8),
                           ledger=PrivacyLedger(tmp_path / "ledger.json", PrivacySettings(epsilon=8.0)),
                           planned_rounds=1, server_round=1, run_id=1)
    changed = {key for key in before if not np.array_equal(before[key], result.adapter[key])}
    assert any("lora_B" in key for key in changed) and any("classifier" in key for key in changed)
    assert all(np.isfinite(value).all() for value in result.adapter.values())


def _padded(chunk_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, units: torch.Tensor,
            width: int) -> Chunk:
    """The same rows right-padded (pad token 0, mask 0) to ``width`` tokens."""
    extra = width - chunk_ids.shape[1]
    pad = torch.zeros((len(chunk_ids), extra), dtype=torch.long)
    return Chunk(torch.cat([chunk_ids, pad], 1), torch.cat([mask, pad], 1), labels, units, int(units.max()) + 1)


@pytest.mark.model
@pytest.mark.parametrize("clip", [1e-3, 0.1])
def test_one_units_clipped_contribution_stays_within_c_at_every_padding_width_on_a_bf16_base(drug_reviews, clip):
    """A patient's two rows, padded to 12-32 tokens (as passes beside longer rows pad them): in bf16 the raw
    gradient moves with the width, but what the unit adds to the clipped sum never exceeds C."""
    labels = label_names(drug_reviews)
    model = build_model("", len(labels), LoraSettings(), "classification", BF16)
    model.train()
    for module in model.modules():  # dropout off: only the width differs between the passes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = encode(drug_reviews[:2], labels, load_tokenizer(""), 12, "t")
    ids, mask, targets = data.dataset.tensors
    capture = LinearCapture(trainable_linears(model))
    raw, contributions = [], []
    for width in (ids.shape[1], 16, 24, 32):
        chunk = _padded(ids, mask, targets, torch.zeros(2, dtype=torch.long), width)
        with capture.recording():
            loss = forward_loss(model, chunk)
        grads = capture.per_row_gradients(loss, 2)
        assert {g.dtype for g in grads.values()} == {torch.float32}
        raw.append(torch.cat([g.sum(0).flatten() for g in grads.values()]))
        clipped, zeroed = clipped_units(grads, chunk.unit_of_row, 1, clip)  # one unit: [1, *shape] each
        assert zeroed == 0
        contributions.append(torch.cat([g.flatten() for g in clipped.values()]))
    for contribution in contributions:
        assert contribution.dtype == torch.float32 and float(contribution.norm()) <= clip * (1 + 1e-6)
    assert min(float(r.norm()) for r in raw) > clip  # every contribution was clipped: the bound was at stake
    moved = max(float((r - raw[0]).norm() / raw[0].norm()) for r in raw)
    print(f"bf16 base: the unit's raw gradient moves by up to {moved:.2%} across padding widths")


def test_the_dp_step_refuses_trainable_parameters_that_are_not_fp32():
    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    with pytest.raises(UnsupportedLayer, match="not fp32"):
        PerUnitDPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=1, generator=torch.Generator())


class _Layout(torch.nn.Module):
    """A linear layer fed [rows, tokens, features] rearranged as ``arrange`` says."""

    def __init__(self, arrange) -> None:
        super().__init__()
        self.linear, self.arrange = torch.nn.Linear(4, 3), arrange

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.arrange(x)).sum()


@pytest.mark.parametrize("arrange", [lambda x: x.transpose(0, 1),  # sequence-first [tokens, rows, features]
                                     lambda x: x.reshape(-1, x.shape[-1]),  # rows and tokens flattened together
                                     lambda x: x.mean(0, keepdim=True)])  # pooled over the batch
def test_per_row_gradients_refuse_a_layer_whose_inputs_are_not_batch_first(arrange):
    model = _Layout(arrange)
    capture = LinearCapture(trainable_linears(model))
    rows, tokens = 2, 5
    with capture.recording():
        loss = model(torch.randn(rows, tokens, 4))
    with pytest.raises(UnsupportedLayer, match="batch-first"):
        capture.per_row_gradients(loss, rows)
