"""One unit cannot decide a site's reply, tried from the coordinator's side (issue 19, finding 2).

The attack: the coordinator sends an adapter whose head makes one target record's logits overflow (a
membership test for a canary record). Before per-unit isolation the NaN passed the clip (C / NaN),
poisoned the sum, and the site answered ``training-failed`` exactly when the record was there (ε = ∞).
Now a unit whose gradient is not finite contributes zero, a pass that raises is retried unit by unit,
and the reply is the same with the record and without it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from client.per_unit_grads import PerUnitDPSGD
from client.plan import TrainingPlan
from client.train import UnitBatches, forward_loss
from common.config import LoraSettings, TrainSettings
from common.encoding import encode
from common.model import build_model, load_tokenizer
from common.records import pack_train_request
from tests.conftest import write_csv
from tests.test_site_releases import call, initial_adapter, node_config, run_config

CANARY = {"text": "zebra quartz xylophone 4711 zyprexa canary canary canary", "label": "negative"}
HOT = 1  # "neutral": the class whose logit the attack drives; no other record of the tests carries it
LABELS = ("negative", "neutral", "positive")


def _others(drug_reviews, n: int) -> list[dict[str, str]]:
    return [{"text": r["text"], "label": r["label"]} for r in drug_reviews if r["label"] != LABELS[HOT]][:n]


def _features(texts: list[str]) -> torch.Tensor:
    """What the head reads for each text on the pristine model: the coordinator knows the candidate record."""
    model = build_model("", len(LABELS), LoraSettings())
    head = next(module for name, module in model.named_modules()
                if "modules_to_save.default" in name and isinstance(module, torch.nn.Linear))
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    batch = load_tokenizer("")(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    hook.remove()
    return captured[0]


def hostile_head(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapter with a head whose HOT logit overflows to +inf for the canary only: row HOT points at the
    canary's features (α = 4e37: 1.2e38 + the bias 2.2e38 passes float32's 3.4e38 for the canary, about
    4 · α, while any other text reads at most ~0.7 · α); the other classes' bias 3e38 keeps every other
    record's HOT probability exactly 0, so their gradients stay finite (and, through the other rows, nonzero)."""
    direction = _features([CANARY["text"]])[0]
    weight = state["base_model.model.classifier.weight"].copy()
    weight[HOT] = (4e37 * direction / direction.norm()).numpy()
    bias = np.full(len(LABELS), 3e38, dtype=np.float32)
    bias[HOT] = 2.2e38
    return state | {"base_model.model.classifier.weight": weight, "base_model.model.classifier.bias": bias}


@pytest.mark.model
@pytest.mark.parametrize(("batch_size", "epochs"), [(8, 1), (2, 2)])  # q = 1; q = 0.25 (2/7 without the canary)
def test_a_record_whose_logits_overflow_cannot_decide_the_reply(tmp_path: Path, drug_reviews, caplog, batch_size,
                                                                 epochs):
    from client.app import train

    config = run_config(tmp_path, **{"data.labels": ",".join(LABELS), "train.batch-size": batch_size,
                                     "train.local-epochs": epochs})
    request = pack_train_request(hostile_head(initial_adapter(config)), 1)
    others = _others(drug_reviews, 7)
    replies, zeroed = {}, {}
    # Attempt 0 with the record: it is the site's whole evaluation split (--eval-data) and does not train; attempts
    # 1-3: it trains (no evaluation split; at q = 0.25 a run may not sample it, three will).
    held_out = write_csv(tmp_path / "eval.csv", [CANARY])
    without = write_csv(tmp_path / "site-without.csv", others)
    for present in (True, False):
        data = write_csv(tmp_path / f"site-{present}.csv", ([CANARY] if present else []) + others)
        for attempt in range(4):
            caplog.clear()
            evaluates = present and attempt == 0
            policy = {"eval-data": str(held_out)} if evaluates else {"eval-fraction": 0.0}
            with caplog.at_level(logging.WARNING, logger="fedtune.client"):
                reply = call(train, request, config, node_config(tmp_path, f"site-{present}-{attempt}",
                                                                 without if evaluates else data, **policy))
            replies[present, attempt] = reply
            zeroed[present, attempt] = any("not finite" in r.getMessage() for r in caplog.records)
    for (present, attempt), reply in replies.items():
        assert "failure" not in reply.config_records, (present, attempt, dict(reply.config_records["failure"]))
        assert set(reply.array_records) == {"update", "evaluation"}  # the noisy evaluation counts, always
        assert np.isfinite(reply.array_records["update"]["delta"].numpy()).all()
    # The attack bites (the canary's gradient overflowed and was zeroed, at the site only), yet the reply's kind
    # and its fields are the same with the record and without it.
    assert any(zeroed[True, attempt] for attempt in (1, 2, 3)) and not any(zeroed[False, a] for a in range(4))
    assert len({tuple(sorted(reply.config_records)) for reply in replies.values()}) == 1


def _model_without_dropout(aggregation: str = "ffa") -> torch.nn.Module:
    model = build_model("", len(LABELS), LoraSettings(aggregation=aggregation))
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _noiseless_step(state: dict[str, np.ndarray], data, units: list[int], *, tokens: int = 4096,
                    before_forward=None) -> tuple[dict[str, torch.Tensor], int]:
    """(the trainable parameters after one noiseless DP step over ``units`` (SGD, lr 1, expected batch 1), the
    units that contributed zero)."""
    from common.adapter import set_adapter_state

    model = _model_without_dropout()
    set_adapter_state(model, state)
    if before_forward is not None:
        model.register_forward_pre_hook(before_forward, with_kwargs=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dp_sgd = PerUnitDPSGD(model, torch.optim.SGD(trainable, lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                          expected_batch_size=1, generator=torch.Generator())
    plan = TrainingPlan(batch_size=1, units=data.unit_count, steps=1, learning_rate=1.0, max_grad_norm=1.0)
    batches = UnitBatches(data, plan, TrainSettings(physical_batch_tokens=tokens), poisson=True)
    dp_sgd.step(batches.chunks(units), lambda chunk: forward_loss(model, chunk))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, dp_sgd.zeroed_units


@pytest.mark.model
def test_a_unit_whose_gradient_is_not_finite_adds_zero_and_leaves_the_other_units_of_its_pass_alone(drug_reviews):
    """The canary and three other records share one pass: its logits overflow (its loss and gradient are NaN),
    the others' contributions are exactly what they are without it."""
    records = [CANARY, *_others(drug_reviews, 3)]
    data = encode(records, LABELS, load_tokenizer(""), 16, "t")
    state = hostile_head(initial_adapter(run_config(Path("unused"), **{"data.labels": ",".join(LABELS)})))
    with_canary, zeroed = _noiseless_step(state, data, [0, 1, 2, 3])
    without, none_zeroed = _noiseless_step(state, data, [1, 2, 3])
    assert zeroed == 1 and none_zeroed == 0
    for name, value in with_canary.items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, without[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(value, torch.zeros_like(value)) for n, value in without.items() if "lora_B" in n)


@pytest.mark.model
def test_a_pass_that_raises_is_retried_unit_by_unit_and_a_unit_that_raises_alone_adds_zero(drug_reviews):
    """A device that cannot hold a row of more than 12 tokens (out of memory): the pass holding the long record
    raises, its units are retried one by one, and the long one alone contributes zero."""
    short = [dict(r, text=" ".join(r["text"].split()[:4])) for r in _others(drug_reviews, 3)]
    long = dict(_others(drug_reviews, 4)[3], text="word " * 40)
    data = encode([*short, long], LABELS, load_tokenizer(""), 32, "t")
    state = initial_adapter(run_config(Path("unused"), **{"data.labels": ",".join(LABELS)}))

    def small_device(module, args, kwargs):
        if int(kwargs["attention_mask"].sum(1).max()) > 12:
            raise torch.OutOfMemoryError("CUDA out of memory (a device too small for this row)")

    contained, zeroed = _noiseless_step(state, data, [0, 1, 2, 3], before_forward=small_device)
    reference, none_zeroed = _noiseless_step(state, data, [0, 1, 2])
    assert zeroed == 1 and none_zeroed == 0
    for name, value in contained.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6)


@pytest.mark.model
def test_a_model_that_cannot_train_fails_loudly_before_any_unit(tmp_path: Path, drug_reviews):
    """A failure that is no unit's (here every pass raises) is not mistaken for units: the public probe pass
    raises it before the first step, so the site never releases noise as if it had trained."""
    from client.privacy import PrivacyLedger
    from client.train import train_locally
    from common.config import PrivacySettings

    data = encode(_others(drug_reviews, 6), LABELS, load_tokenizer(""), 16, "t")
    model = build_model("", len(LABELS), LoraSettings())

    def broken(module, args, kwargs):
        raise RuntimeError("a bug in every forward pass")

    model.register_forward_pre_hook(broken, with_kwargs=True)
    with pytest.raises(RuntimeError, match="a bug in every forward pass"):
        train_locally(model, data, TrainSettings(batch_size=6, local_epochs=1), planned_rounds=1, server_round=1,
                      run_id=1, ledger=PrivacyLedger(tmp_path / "ledger.json", PrivacySettings(epsilon=8.0)))


def test_passes_are_cut_by_a_token_budget_and_a_unit_is_never_split(drug_reviews):
    rows = [dict(r, text=" ".join(r["text"].split()[: 2 + 3 * i]), patient="p0" if i < 3 else f"p{i}")
            for i, r in enumerate(_others(drug_reviews, 9))]
    data = encode(rows, LABELS, load_tokenizer(""), 32, "t", unit_column="patient")
    plan = TrainingPlan(batch_size=7, units=data.unit_count, steps=1, learning_rate=1.0, max_grad_norm=1.0)
    budget = 48
    chunks = UnitBatches(data, plan, TrainSettings(physical_batch_tokens=budget, max_rows_per_unit=3),
                         poisson=False).chunks(list(range(data.unit_count)))
    assert sum(chunk.units for chunk in chunks) == data.unit_count and len(chunks) > 1
    for chunk in chunks:  # rows × padded width within the budget, unless the pass holds one unit alone
        assert chunk.units == 1 or chunk.input_ids.numel() <= budget
    assert max(int(chunk.unit_of_row.bincount().max()) for chunk in chunks) == 3  # p0's three rows share a pass


def test_the_site_policy_owns_max_rows_per_unit_and_a_run_can_only_lower_it(tmp_path: Path):
    import json

    from client.policy import POLICY_FILE, SitePolicy
    from common.config import ConfigError, RunSettings
    from fedtune.cli import simulated_site_policies

    policy = SitePolicy.from_mapping({"labels": ",".join(LABELS), "max-rows-per-unit": "2"}, "node config")
    for asked, trained in ((8, 2), (64, 2), (1, 1)):
        settings = RunSettings.from_flat({"data.labels": ",".join(LABELS), "secagg.registry": "r.json",
                                          "train.max-rows-per-unit": asked})
        assert policy.train_settings(settings).max_rows_per_unit == trained
    with pytest.raises(ConfigError, match="max-rows-per-unit must be >= 1"):
        SitePolicy(labels=LABELS, max_rows_per_unit=0)
    # A simulation plays every site: its --max-rows-per-unit becomes each simulated site's policy.
    simulated_site_policies(tmp_path, 1, task="classification", labels=",".join(LABELS), model="", dp=True,
                            secure=True, epsilon=8.0, unit="record", max_rows_per_unit=3)
    assert json.loads((tmp_path / "sites" / "site-0" / POLICY_FILE).read_text())["max-rows-per-unit"] == 3
