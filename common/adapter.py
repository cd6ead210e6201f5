"""Adapter state: get/set on a model, the trainable layout, deltas, PEFT-format files.

An adapter state is a dict of numpy arrays keyed by PEFT's adapter-state names
(``get_peft_model_state_dict``), always iterated in sorted key order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.numpy import save_file

AdapterState = dict[str, np.ndarray]


def unwrap(model: torch.nn.Module) -> PeftModel:
    """The PeftModel inside an Opacus GradSampleModule (whose keys gain ``_module.``)."""
    inner = getattr(model, "_module", model)
    if not isinstance(inner, PeftModel):
        raise TypeError(f"expected a PeftModel, got {type(inner).__name__}")
    return inner


def get_adapter_state(model: torch.nn.Module) -> AdapterState:
    state = get_peft_model_state_dict(unwrap(model))
    return {key: state[key].detach().cpu().numpy().astype(np.float32, copy=True) for key in sorted(state)}


def set_adapter_state(model: torch.nn.Module, state: AdapterState) -> None:
    peft_model = unwrap(model)
    expected = set(get_peft_model_state_dict(peft_model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter state does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    set_peft_model_state_dict(peft_model, {key: torch.from_numpy(value.copy()) for key, value in state.items()})


def trainable_keys(state: AdapterState, aggregation: str) -> list[str]:
    """The keys sites train and send, in wire order. FFA-LoRA keeps every ``lora_A`` frozen."""
    return [key for key in sorted(state) if not (aggregation == "ffa" and "lora_A" in key)]


def flatten(state: AdapterState, keys: list[str]) -> np.ndarray:
    return np.concatenate([state[key].ravel() for key in keys]).astype(np.float32, copy=False)


def unflatten(vector: np.ndarray, template: AdapterState, keys: list[str]) -> AdapterState:
    sizes = [template[key].size for key in keys]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(f"update has {vector.size} values, the adapter layout needs {sum(sizes)}")
    parts = np.split(vector, np.cumsum(sizes)[:-1])
    return {key: part.reshape(template[key].shape).astype(np.float32) for key, part in zip(keys, parts, strict=True)}


def delta(after: AdapterState, before: AdapterState, keys: list[str]) -> np.ndarray:
    """after - before over ``keys``, flattened: what a site sends."""
    return flatten(after, keys) - flatten(before, keys)


def apply_delta(state: AdapterState, update: np.ndarray, keys: list[str]) -> AdapterState:
    """state + update over ``keys``; other keys are copied unchanged."""
    moved = unflatten(update, state, keys)
    return {key: (state[key] + moved[key] if key in moved else state[key].copy()) for key in sorted(state)}


def save_peft_adapter(model: torch.nn.Module, state: AdapterState, directory: Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained``."""
    peft_model = unwrap(model)
    directory.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(str(directory))
    save_file({key: np.ascontiguousarray(value) for key, value in state.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
