"""Local training on the real MiniLM + LoRA (tiny sizes): what trains, what stays frozen, DP edge cases."""

from pathlib import Path

import numpy as np
import pytest
import torch

import client.train as train_module
from client.privacy import BudgetExhausted, PrivacyLedger
from client.train import train_locally
from common.adapter import get_adapter_state, set_adapter_state, trainable_keys
from common.config import LoraSettings, PrivacySettings, TrainSettings
from common.data import label_names
from common.encoding import encode
from common.model import build_model, load_tokenizer

TINY = TrainSettings(learning_rate=0.02, local_epochs=1, batch_size=4, physical_batch_tokens=4 * 16,
                     max_rows_per_unit=4)


@pytest.fixture()
def tiny_data(drug_reviews):
    labels = label_names(drug_reviews)
    return encode(drug_reviews[:12], labels, load_tokenizer(""), 16, "test"), labels


@pytest.mark.model
def test_ffa_trains_b_and_head_only_and_dp_spends_within_budget(tmp_path: Path, tiny_data):
    data, labels = tiny_data
    model = build_model("", len(labels), LoraSettings())
    before = get_adapter_state(model)
    ledger = PrivacyLedger(tmp_path / "ledger.json", PrivacySettings(epsilon=8.0))
    result = train_locally(model, data, TINY, ledger=ledger, planned_rounds=2, server_round=1, run_id=1)
    after = result.adapter
    changed = {key for key in before if not np.array_equal(before[key], after[key])}
    assert changed == set(trainable_keys(before, "ffa"))  # every lora_B and the head moved; no lora_A
    assert any("lora_B" in key for key in changed) and any("classifier" in key for key in changed)
    assert result.steps == -(-ledger.estimate.units // 4)  # one epoch of the site's public size ñ, B = 4
    assert 0 < result.epsilon <= 8.0
    ledger = PrivacyLedger(tmp_path / "ledger.json", PrivacySettings(epsilon=8.0))
    assert ledger.spent() == pytest.approx(result.epsilon)


@pytest.mark.model
def test_a_site_continues_its_adamw_moments_across_rounds(tiny_data):
    data, labels = tiny_data
    model = build_model("", len(labels), LoraSettings())
    first = train_locally(model, data, TINY, ledger=None, planned_rounds=2, server_round=1, run_id=1)
    second = train_locally(model, data, TINY, ledger=None, planned_rounds=2, server_round=2, run_id=1,
                           optimizer_state=first.optimizer_state)
    fresh = train_locally(model, data, TINY, ledger=None, planned_rounds=2, server_round=2, run_id=1)
    def steps(result):
        return {float(s["step"]) for s in result.optimizer_state["state"].values()}
    assert steps(first) == {3.0} and steps(second) == {6.0} and steps(fresh) == {3.0}


@pytest.mark.model
def test_plain_lora_trains_a_too(tiny_data):
    data, labels = tiny_data
    model = build_model("", len(labels), LoraSettings(aggregation="plain"))
    before = get_adapter_state(model)
    after = train_locally(model, data, TINY, ledger=None, planned_rounds=1, server_round=1, run_id=1).adapter
    assert any("lora_A" in key and not np.array_equal(before[key], after[key]) for key in before)


@pytest.mark.model
def test_empty_poisson_batches_are_survived_and_still_counted(tmp_path: Path, tiny_data, monkeypatch):
    data, labels = tiny_data
    small = encode_subset(data, 3)
    forwards = []
    real_forward = train_module.forward_loss
    monkeypatch.setattr(train_module, "forward_loss", lambda m, c: forwards.append(len(c.labels)) or real_forward(m, c))
    settings = TrainSettings(learning_rate=0.02, local_epochs=10, batch_size=1, physical_batch_tokens=3 * 16,
                             max_rows_per_unit=3)
    ledger = PrivacyLedger(tmp_path / "l.json", PrivacySettings(epsilon=8.0))
    result = train_locally(build_model("", len(labels), LoraSettings()), small, settings, ledger=ledger,
                           planned_rounds=1, server_round=1, run_id=1, public_units=3)  # a site that declares 3
    # q = 1/3, 30 logical steps, one chunk each: a step without a forward pass had an empty batch,
    # and it still counted (noise added, accountant advanced). A batch is empty with probability
    # (2/3)³ ≈ 0.30, so 30 steps all non-empty (or all empty) has probability below 3·10⁻⁵.
    assert result.steps == 30 and ledger.history[-1][2] == 30
    assert forwards[0] == 1  # the public probe pass, before any step
    assert 0 < len(forwards[1:]) < 30


def encode_subset(data, n):
    from torch.utils.data import TensorDataset

    from common.encoding import EncodedData

    return EncodedData(TensorDataset(*(t[:n] for t in data.dataset.tensors)), data.labels[:n], data.units[:n])


@pytest.mark.model
def test_a_site_at_its_budget_refuses_before_training(tmp_path: Path, tiny_data):
    data, labels = tiny_data
    settings = PrivacySettings(epsilon=1.0)
    ledger = PrivacyLedger(tmp_path / "l.json", settings)
    model = build_model("", len(labels), LoraSettings())
    train_locally(model, data, TINY, ledger=ledger, planned_rounds=1, server_round=1, run_id=1)
    untouched = get_adapter_state(model)
    with pytest.raises(BudgetExhausted) as info:
        train_locally(model, data, TINY, ledger=PrivacyLedger(tmp_path / "l.json", settings), planned_rounds=1,
                      server_round=2, run_id=1)
    assert "budget ε=1" in str(info.value) and f"from {ledger.spent():.3f}" in str(info.value)
    assert all(np.array_equal(untouched[k], v) for k, v in get_adapter_state(model).items())


@pytest.mark.model
def test_the_coordinator_cannot_replay_a_dp_update(tmp_path: Path, tiny_data):
    # The coordinator knows the config, data seed, site, round and run id, and here even picks torch's
    # global seed: the same site trained twice, and its replay on a fresh ledger, all give different updates.
    data, labels = tiny_data
    model = build_model("", len(labels), LoraSettings())
    start = get_adapter_state(model)
    updates = []
    for ledger_dir in ("site", "site", "replay"):
        set_adapter_state(model, start)
        torch.manual_seed(1234)
        ledger = PrivacyLedger(tmp_path / ledger_dir / "ledger.json", PrivacySettings(epsilon=8.0))
        updates.append(train_locally(model, data, TINY, ledger=ledger, planned_rounds=2, server_round=1,
                                     run_id=1).adapter)
    for other in updates[1:]:
        assert any(not np.array_equal(updates[0][key], other[key]) for key in start)


def test_a_crash_during_training_leaves_the_round_charged(tmp_path: Path, tiny_data, monkeypatch):
    data, labels = tiny_data

    def power_cut(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(train_module, "_train_private", power_cut)
    settings = PrivacySettings(epsilon=8.0)
    with pytest.raises(RuntimeError, match="power cut"):
        train_locally(torch.nn.Linear(16, len(labels)), data, TINY, ledger=PrivacyLedger(tmp_path / "l.json", settings),
                      planned_rounds=2, server_round=1, run_id=1)
    restarted = PrivacyLedger(tmp_path / "l.json", settings)
    assert [entry.round for entry in restarted.rounds] == [1] and restarted.spent() > 0


def test_audit_canaries_are_refused_without_dp(tiny_data):
    """Canaries go in the DP-SGD step: without DP there is no step to put them in, and no audit to make."""
    from client.canaries import draw_canaries

    data, labels = tiny_data
    model = torch.nn.Linear(16, len(labels))
    with pytest.raises(ValueError, match="without DP"):
        train_locally(model, data, TINY, ledger=None, planned_rounds=1, server_round=1, run_id=1,
                      canaries=draw_canaries(model, 4))


def _patients(drug_reviews, rows_of_first: int) -> list[dict]:
    """Reviews as rows of patients: patient p0 wrote ``rows_of_first`` of them, every other patient one."""
    return [dict(row, patient="p0" if i < rows_of_first else f"p{i}") for i, row in enumerate(drug_reviews[:12])]


def _one_dp_step(model, data, units: list[int], clip: float) -> float:
    """The norm of what one noiseless DP-SGD step (SGD, lr 1, expected batch 1) moves the adapter by."""
    from client.per_unit_grads import PerUnitDPSGD
    from client.plan import TrainingPlan
    from client.train import UnitBatches, forward_loss

    before = torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    dp_sgd = PerUnitDPSGD(model, torch.optim.SGD(trainable, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                          expected_batch_size=1, generator=torch.Generator())
    plan = TrainingPlan(batch_size=1, units=data.unit_count, steps=1, learning_rate=1.0, max_grad_norm=clip)
    batches = UnitBatches(data, plan, TrainSettings(physical_batch_tokens=4 * 16, max_rows_per_unit=4), poisson=True)
    dp_sgd.step(batches.chunks(units), lambda chunk: forward_loss(model, chunk))
    after = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    return float((after - before).norm())


@pytest.mark.model
def test_clipping_is_per_unit_a_patient_with_many_rows_moves_the_update_no_more_than_one(drug_reviews):
    labels = label_names(drug_reviews)
    tokenizer, clip = load_tokenizer(""), 1e-3  # far below any gradient's norm: every unit is clipped
    per_patient = encode(_patients(drug_reviews, 10), labels, tokenizer, 16, "t", unit_column="patient")
    assert per_patient.unit_count == 3 and len(per_patient.rows_by_unit()[0]) == 10
    start = get_adapter_state(build_model("", len(labels), LoraSettings()))

    def moved(data, units):
        model = build_model("", len(labels), LoraSettings())
        set_adapter_state(model, start)
        return _one_dp_step(model, data, units, clip)

    many_rows, one_row = moved(per_patient, [0]), moved(per_patient, [1])
    # The unit holds 10 rows, of which at most max_rows_per_unit=4 train; summed, then clipped once.
    assert many_rows <= clip * (1 + 1e-4) and one_row <= clip * (1 + 1e-4)
    assert many_rows == pytest.approx(clip, rel=1e-3)
    # Control: the same rows as record-level units are clipped one by one and add up past C.
    per_record = encode(_patients(drug_reviews, 10), labels, tokenizer, 16, "t")
    assert moved(per_record, [0, 1, 2, 3]) > 1.2 * clip


def test_a_large_unit_trains_at_most_max_rows_per_unit_rows_per_step(drug_reviews, monkeypatch):
    labels = label_names(drug_reviews)
    data = encode(_patients(drug_reviews, 10), labels, load_tokenizer(""), 16, "t", unit_column="patient")
    from client.plan import TrainingPlan
    from client.train import UnitBatches

    plan = TrainingPlan(batch_size=3, units=3, steps=1, learning_rate=0.1, max_grad_norm=1.0)
    chunks = UnitBatches(data, plan, TrainSettings(physical_batch_tokens=4 * 16, max_rows_per_unit=4),
                         poisson=True).chunks([0, 1, 2])
    assert sorted(len(c.labels) for c in chunks) == [2, 4]  # the 10-row unit capped at 4; two 1-row units
    assert sum(c.units for c in chunks) == 3
    for chunk in chunks:  # trimmed to its own longest row, never to the site's
        assert chunk.attention_mask[:, -1].any() and chunk.input_ids.shape[1] <= data.dataset.tensors[0].shape[1]


def test_padding_is_per_chunk_so_short_rows_train_on_short_tensors(drug_reviews):
    labels = label_names(drug_reviews)
    rows = [dict(drug_reviews[0], text="short"), dict(drug_reviews[1], text="word " * 60)]
    data = encode(rows, labels, load_tokenizer(""), 64, "t")
    from client.plan import TrainingPlan
    from client.train import UnitBatches

    plan = TrainingPlan(batch_size=1, units=2, steps=1, learning_rate=0.1, max_grad_norm=1.0)
    batches = UnitBatches(data, plan, TrainSettings(physical_batch_tokens=1, max_rows_per_unit=1), poisson=True)
    widths = sorted(chunk.input_ids.shape[1] for chunk in batches.chunks([0, 1]))
    assert widths[0] <= 4 and widths[1] == data.dataset.tensors[0].shape[1] > 50


def test_a_pass_holds_no_row_at_most_half_its_width_so_a_small_batch_is_not_padded_to_its_longest(drug_reviews):
    """Before: a pass was filled to the token budget whatever its rows' lengths, so a site's ~100 sampled units
    were padded to the longest of them (2.5× the tokens, 2.2× slower than the same units pooled)."""
    labels = label_names(drug_reviews)
    texts = ["word " * 40, "word " * 30, "word " * 12, "word " * 10, "ok", "fine"]
    data = encode([dict(drug_reviews[0], text=t) for t in texts], labels, load_tokenizer(""), 64, "t")
    from client.plan import TrainingPlan
    from client.train import UnitBatches

    plan = TrainingPlan(batch_size=6, units=6, steps=1, learning_rate=0.1, max_grad_norm=1.0)
    chunks = UnitBatches(data, plan, TrainSettings(physical_batch_tokens=4096), poisson=True).chunks(list(range(6)))
    assert [len(chunk.labels) for chunk in chunks] == [2, 2, 2]  # all 6 would fit the budget in one pass
    for chunk in chunks:  # each row longer than half its pass's width (its longest row's)
        assert (2 * chunk.attention_mask.sum(1) > chunk.input_ids.shape[1]).all(), chunk.attention_mask.sum(1)


def test_a_site_trains_where_its_policy_says_and_cuda_without_a_gpu_is_a_clear_error():
    from client.policy import SitePolicy
    from common.config import ConfigError
    from common.model import ModelError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="device"):
        SitePolicy(labels=("a",), device="tpu")
