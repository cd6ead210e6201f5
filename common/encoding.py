"""Records to tensors: token ids, attention masks and targets, with each row's privacy unit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from common.causal_lm import encode_chats
from common.config import TaskKind
from common.data import Record, encode_labels, unit_indices


@dataclass(frozen=True)
class EncodedData:
    """Tokenised examples (padded to the longest; training trims each forward pass to its own longest),
    and the privacy unit of each row: ``units[i]`` indexes the person (or the record itself) row i belongs to.

    ``dataset`` holds (input_ids, attention_mask, targets): a class index per row (classification), or the
    next token at each position, -100 outside the answer (causal-lm, whose answers are also kept as text)."""

    dataset: TensorDataset
    labels: np.ndarray
    """Classification: each row's class index (causal-lm: the token targets)."""
    units: np.ndarray
    task: TaskKind = "classification"
    answers: tuple[str, ...] = ()
    """Causal-lm: each row's reference answer."""
    questions: tuple[str, ...] = ()
    """Causal-lm: the turn each answer replies to."""

    def __len__(self) -> int:
        return len(self.units)

    @property
    def unit_count(self) -> int:
        return int(self.units.max()) + 1 if len(self.units) else 0

    def rows_by_unit(self) -> list[np.ndarray]:
        """The row indices of each unit, in unit order."""
        order = np.argsort(self.units, kind="stable")
        return np.split(order, np.flatnonzero(np.diff(self.units[order])) + 1) if len(order) else []


def encode(
    records: list[Record], names: tuple[str, ...], tokenizer: PreTrainedTokenizerBase, max_length: int, where: str,
    *, unit_column: str = "", task: TaskKind = "classification",
) -> EncodedData:
    """Tokens, targets and privacy units of ``records`` (``names``: the classification labels; causal-lm: ())."""
    units = unit_indices(records, unit_column, where)
    if task == "causal-lm":
        chats = encode_chats(records, tokenizer, max_length, where)
        return EncodedData(chats.tensors(), chats.targets.numpy(), units, task, chats.answers, chats.questions)
    labels = encode_labels(records, names, where)
    batch = tokenizer(
        [row["text"] for row in records], truncation=True, max_length=max_length,
        padding="longest", return_tensors="pt",
    )
    dataset = TensorDataset(batch["input_ids"], batch["attention_mask"], torch.from_numpy(labels))
    return EncodedData(dataset=dataset, labels=labels, units=units)
