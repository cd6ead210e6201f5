"""Causal-lm pieces on the real SmolLM2 tokenizer and model: what carries a loss, truncation, the loss itself,
the scores, and the errors a person gets for data, config and policy that do not fit the task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.policy import PolicyError, SitePolicy
from common.causal_lm import IGNORE, answer_loss, answer_losses, most_common_answer_scores, normalise, rouge_l
from common.config import ConfigError, FederationSettings, LoraSettings, RunSettings
from common.data import DataError, read_records
from common.encoding import encode
from common.model import build_model, load_tokenizer

LLM = "smollm2"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(LLM)


def chats(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"prompt": prompt, "response": response} for prompt, response in pairs]


def test_only_the_answer_and_its_end_of_turn_carry_a_loss(tokenizer) -> None:
    data = encode(chats(("What is the capital of France?", "Paris"), ("Say yes.", "yes")), (), tokenizer, 64, "t",
                  task="causal-lm")
    input_ids, attention_mask, targets = data.dataset.tensors
    for row, answer in enumerate(("Paris", "yes")):
        learned = targets[row][targets[row] != IGNORE]
        assert tokenizer.decode(learned).startswith(answer + tokenizer.eos_token)
        first = int((targets[row] != IGNORE).int().argmax())
        # each target is the next input token: the prompt up to the assistant's header predicts the answer
        length = int(attention_mask[row].sum())
        assert torch.equal(targets[row, first:length - 1], input_ids[row, first + 1:length])
        assert "What is the capital" in tokenizer.decode(input_ids[row, :first + 1]) or row == 1
    assert data.answers == ("Paris", "yes") and len(data) == 2 and data.task == "causal-lm"


def test_a_long_prompt_keeps_its_end_and_the_answer_survives(tokenizer) -> None:
    prompt = "word " * 400 + "Is this review positive?"
    data = encode(chats((prompt, "positive")), (), tokenizer, 32, "t", task="causal-lm")
    input_ids, _, targets = data.dataset.tensors
    assert input_ids.shape[1] <= 32
    text = tokenizer.decode(input_ids[0])
    assert "Is this review positive?" in text and text.rstrip().endswith(tokenizer.eos_token)
    assert tokenizer.decode(targets[0][targets[0] != IGNORE]).startswith("positive")


def test_chat_messages_encode_like_a_prompt_and_response(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    from_messages = encode(read_records(str(path), task="causal-lm"), (), tokenizer, 64, "t", task="causal-lm")
    from_pair = encode(chats(("Hi?", "Hello.")), (), tokenizer, 64, "t", task="causal-lm")
    for a, b in zip(from_messages.dataset.tensors, from_pair.dataset.tensors, strict=True):
        assert torch.equal(a, b)


@pytest.mark.model
def test_the_loss_is_each_answers_mean_then_the_mean_over_rows_whatever_the_padding(tokenizer) -> None:
    """A long answer does not outweigh a short one, and padding a row to its batch changes nothing: per-row
    means computed one row at a time agree with the batched loss (DP-SGD clips this per-row loss's gradient)."""
    model = build_model(LLM, 0, LoraSettings(), "causal-lm")
    rows = chats(("Name a colour.", "Blue"), ("Tell me a long story about a cat.", "Once upon a time a cat sat."))
    data = encode(rows, (), tokenizer, 64, "t", task="causal-lm")
    with torch.no_grad():
        batched = float(answer_loss(model, *data.dataset.tensors))
        alone = []
        for row in rows:
            one = encode([row], (), tokenizer, 64, "t", task="causal-lm").dataset.tensors
            total, count = answer_losses(model, *one)
            alone.append(float(total[0] / count[0]))
    assert batched == pytest.approx(sum(alone) / 2, abs=1e-5)
    assert abs(alone[0] - alone[1]) > 1e-3  # two different rows: the test can tell a token mean from a row mean


def test_scores_of_generated_answers() -> None:
    assert normalise("  Positive. ") == normalise("positive") == "positive"
    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("dog", "the cat") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    floor = most_common_answer_scores(("yes", "yes", "no", "Yes."))
    assert floor["exact_match"] == 0.75 and floor["rouge_l"] == 0.75


@pytest.mark.parametrize(("line", "message"), [
    ({"prompt": "q"}, "missing column"),
    ({"text": "q", "label": "a"}, "prompt"),
    ({"prompt": "q", "response": " "}, "empty 'response'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant"),
    ({"messages": "hello"}, "list of"),
])
def test_causal_lm_data_that_does_not_fit_gets_a_clear_error(tmp_path: Path, line: dict, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        read_records(str(path), task="causal-lm")


def test_a_causal_lm_run_needs_a_generative_model_and_a_site_refuses_another_task() -> None:
    with pytest.raises(ConfigError, match="smollm2"):
        RunSettings(task="causal-lm", federation=FederationSettings(secure_aggregation=False))
    run = RunSettings.from_flat({"task": "causal-lm", "model-path": LLM, "federation.secure-aggregation": False})
    with pytest.raises(PolicyError, match="task"):
        SitePolicy(labels=("a", "b")).check_task(run)
    SitePolicy(task="causal-lm", model_path=LLM).check_task(run)  # its own task and model: accepted
    with pytest.raises(PolicyError, match="model"):
        SitePolicy(task="causal-lm", model_path="").check_task(run)
    classify = RunSettings.from_flat({"model-path": "minilm", "data.labels": "a,b",
                                      "federation.secure-aggregation": False})
    SitePolicy(labels=("a", "b"), model_path="").check_task(classify)  # '' and 'minilm' name the same model


@pytest.mark.model
def test_qlora_trains_lora_b_with_dp_on_a_4bit_base_and_a_classifier_is_refused(tmp_path: Path, tokenizer) -> None:
    """A site may hold the frozen base in 4-bit NF4 (bitsandbytes): the adapter stays fp32 and trains with DP."""
    import numpy as np

    from client.privacy import PrivacyLedger
    from client.train import train_locally
    from common.adapter import get_adapter_state
    from common.config import PrivacySettings, TrainSettings
    from common.model import ModelError, Placement

    model = build_model(LLM, 0, LoraSettings(), "causal-lm", Placement(nf4=True))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    before = get_adapter_state(model)
    data = encode(read_records("drugreview", task="causal-lm")[:6], (), tokenizer, 32, "t", task="causal-lm")
    ledger = PrivacyLedger(tmp_path / "ledger.json", PrivacySettings(epsilon=8.0))
    result = train_locally(model, data, TrainSettings(learning_rate=0.02, local_epochs=1, batch_size=3,
                                                      physical_batch_tokens=3 * 32), ledger=ledger, planned_rounds=1,
                           server_round=1, run_id=1)
    changed = {k for k in before if not np.array_equal(before[k], result.adapter[k])}
    assert changed and all("lora_B" in k for k in changed)
    assert all(value.dtype == np.float32 for value in result.adapter.values())
    with pytest.raises(ModelError, match="causal-lm"):
        build_model("", 3, LoraSettings(), "classification", Placement(nf4=True))
