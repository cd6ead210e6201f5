"""Evaluation as summable counts (a confusion matrix), and the metrics derived from them.

Counts, not averages, cross the wire: sites' confusion matrices add up to the federation's,
which also lets them travel inside a securely aggregated vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.encoding import EncodedData


@dataclass(frozen=True)
class EvalCounts:
    loss_sum: float
    confusion: np.ndarray
    """confusion[true, predicted], int64"""

    @classmethod
    def zeros(cls, num_labels: int) -> EvalCounts:
        return cls(0.0, np.zeros((num_labels, num_labels), dtype=np.int64))

    @property
    def examples(self) -> int:
        return int(self.confusion.sum())

    def __add__(self, other: EvalCounts) -> EvalCounts:
        return EvalCounts(self.loss_sum + other.loss_sum, self.confusion + other.confusion)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: EncodedData, num_labels: int, batch_size: int = 64) -> EvalCounts:
    model.eval()
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    loss_sum = 0.0
    device = next(model.parameters()).device  # a site's model may be on its GPU; the counts are gathered on the CPU
    for start in range(0, len(data), batch_size):
        input_ids, attention_mask, labels = data.dataset[start:start + batch_size]
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float().cpu()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        np.add.at(confusion, (labels.numpy(), logits.argmax(-1).numpy()), 1)
    return EvalCounts(loss_sum, confusion)


def metrics(counts: EvalCounts) -> dict[str, float]:
    """Accuracy, macro-F1 (over labels present or predicted) and mean loss."""
    confusion = counts.confusion.astype(np.float64)
    total = confusion.sum()
    if total == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "loss": float("nan"), "examples": 0}
    true_pos = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    active = (support + predicted) > 0
    f1 = np.divide(2 * true_pos, support + predicted, out=np.zeros_like(true_pos), where=active)
    return {
        "accuracy": float(true_pos.sum() / total),
        "macro_f1": float(f1[active].mean()),
        "loss": counts.loss_sum / total,
        "examples": int(total),
    }


def majority_baseline(test_labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """What always predicting the test split's most common label scores: the floor to beat.

    Taken from the test labels (the server never sees the sites' training data), which makes
    this floor, if anything, a little harder to beat than the training majority would.
    """
    majority = int(np.bincount(test_labels, minlength=num_labels).argmax())
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (test_labels, np.full_like(test_labels, majority)), 1)
    return metrics(EvalCounts(0.0, confusion)) | {"loss": float("nan")}
