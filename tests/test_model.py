"""The round-0 model: what a classifier's head reads, and its start from the public label names or at random."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from common.adapter import get_adapter_state
from common.config import ConfigError, LoraSettings, RunSettings
from common.model import (
    HEAD_TEMPERATURE,
    MaskedMeanPooler,
    ModelError,
    base_model,
    build_model,
    initial_model,
    load_tokenizer,
    resolve_model_path,
    sentence_pooling,
)

INTENTS = ("card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "pin_blocked")


def logits_of(model, texts: list[str]) -> torch.Tensor:
    batch = load_tokenizer("")(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.model
def test_a_label_name_head_classifies_each_label_name_as_its_label_before_any_training():
    model = initial_model("", INTENTS, LoraSettings())
    logits = logits_of(model, [label.replace("_", " ") for label in INTENTS])
    assert logits.argmax(dim=1).tolist() == list(range(len(INTENTS)))
    # A logit is cosine / temperature: a label's own name scores about 1 / 0.05, no class has a bias.
    assert torch.diagonal(logits).numpy() == pytest.approx(1 / HEAD_TEMPERATURE, rel=0.3)
    head_bias = [value for key, value in get_adapter_state(model).items() if "classifier" in key and "bias" in key]
    assert len(head_bias) == 1 and not head_bias[0].any()


@pytest.mark.model
def test_it_classifies_unseen_queries_by_meaning_where_a_random_head_cannot():
    queries = ["my new card still has not been delivered", "what rate do you use to convert euros to dollars",
               "someone took my card from my bag", "the top-up of my account did not go through",
               "I typed the wrong code too many times and now it is locked"]
    labelled = logits_of(initial_model("", INTENTS, LoraSettings()), queries).argmax(dim=1).tolist()
    assert labelled == list(range(len(INTENTS)))
    random_head = initial_model("", INTENTS, LoraSettings(head_init="random"))
    assert torch.equal(logits_of(random_head, queries), logits_of(build_model("", len(INTENTS), LoraSettings()),
                                                                    queries))


@pytest.mark.model
def test_the_start_changes_only_the_head_and_is_the_same_in_every_process():
    started, plain = (get_adapter_state(initial_model("", INTENTS, LoraSettings(head_init=init)))
                      for init in ("label-names", "random"))
    changed = sorted(key for key in plain if not np.array_equal(started[key], plain[key]))
    assert changed and all("classifier" in key for key in changed)
    again = get_adapter_state(initial_model("", INTENTS, LoraSettings()))
    assert all(np.array_equal(started[key], again[key]) for key in started)


def test_an_unknown_head_init_is_refused_by_name():
    with pytest.raises(ConfigError, match="lora.head-init must be one of label-names, random"):
        LoraSettings(head_init="zero-shot")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="head-init"):
        RunSettings.from_flat({"lora.head-init": "zeros"})


@pytest.mark.model
def test_the_head_reads_the_mean_over_each_rows_own_tokens_whatever_pads_it():
    """MiniLM's sentence embedding is a mean over real tokens; padding a row beside a longer one, or
    copying the model (as every site does), must not change what its head reads."""
    model = copy.deepcopy(build_model("", len(INTENTS), LoraSettings()))
    encoder = model.base_model.model.bert
    assert isinstance(encoder.pooler, MaskedMeanPooler)
    assert [hook.__self__ for hook in encoder._forward_pre_hooks.values()] == [encoder.pooler]
    alone = logits_of(model, ["pin blocked"])[0]
    padded = logits_of(model, ["pin blocked", "my card arrived broken and the app will not let me top up at all"])
    assert torch.allclose(alone, padded[0], atol=1e-5)
    assert not torch.allclose(padded[0], padded[1], atol=1e-3)
    batch = load_tokenizer("")(["pin blocked", "a much longer query that pads the first one"], padding=True,
                               return_tensors="pt")
    with torch.no_grad():  # the encoder called directly, the mask passed by position or by name
        by_position = encoder(batch["input_ids"], batch["attention_mask"]).pooler_output
        by_name = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    assert torch.equal(by_position, by_name)


@pytest.mark.model
def test_the_pooling_is_read_from_the_models_sentence_transformers_files(tmp_path):
    assert sentence_pooling(resolve_model_path("")) == "mean"
    assert sentence_pooling(tmp_path) == "architecture"  # a plain Hugging Face directory: its own pooler
    shutil.copytree(resolve_model_path(""), tmp_path / "cls", ignore=shutil.ignore_patterns("*.safetensors"))
    config = tmp_path / "cls" / "1_Pooling" / "config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps(settings | {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}))
    assert sentence_pooling(tmp_path / "cls") == "architecture"
    config.write_text("{not json")  # a broken file is reported, never silently read as another pooling
    with pytest.raises(ModelError, match="Pooling config\\) cannot be read"):
        sentence_pooling(tmp_path / "cls")
    with pytest.raises(ModelError, match="Pooling config\\) cannot be read") as refused:
        base_model(str(tmp_path / "cls"), 3)  # loading says what is wrong once, not inside "cannot load"
    assert "cannot load" not in str(refused.value)
