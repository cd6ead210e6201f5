"""Causal-LM (instruction tuning): chat-template encoding, the response-only loss, and scoring by generation.

A record is a conversation and the assistant's answer to learn: ``prompt``/``response`` (one user turn),
or chat ``messages`` whose last turn is the assistant's. Tokens are the tokenizer's chat template
applied to the whole conversation; only the answer's tokens (its text and end-of-turn) carry a loss,
averaged per sequence first and then over the batch, so a long answer does not outweigh a short one
(DP-SGD clips per-sequence gradients of exactly this loss).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from common.config import BadInput

IGNORE = -100
"""Target of a token that carries no loss (the prompt, the padding)."""
MAX_NEW_TOKENS = 64
SAMPLES_SHOWN = 3


def conversation(record: dict[str, str]) -> tuple[list[dict[str, str]], str]:
    """(the turns before the answer, the answer)."""
    if "messages" in record:
        messages = json.loads(record["messages"])
        return messages[:-1], messages[-1]["content"]
    return [{"role": "user", "content": record["prompt"]}], record["response"]


def _texts(tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], answer: str, where: str) -> tuple[str, str]:
    """(prompt text up to the assistant's header, the answer's text with its end-of-turn)."""
    if not tokenizer.chat_template:
        return "\n\n".join(turn["content"] for turn in turns) + "\n", answer + (tokenizer.eos_token or "")
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise BadInput(f"{where}: the tokenizer's chat template does not render the answer after the prompt; "
                       "use a model whose template appends the assistant's turn")
    return prompt, full[len(prompt):]


@dataclass(frozen=True)
class EncodedChats:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    """The token to predict at each position, IGNORE outside the answer."""
    answers: tuple[str, ...]
    questions: tuple[str, ...]
    """The last turn before each answer, as text (what a report shows next to the answer)."""

    def tensors(self) -> TensorDataset:
        return TensorDataset(self.input_ids, self.attention_mask, self.targets)


def encode_chats(records: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int,
                 where: str) -> EncodedChats:
    """Tokens of each conversation + answer, right-padded to the longest. The answer keeps at most half of
    ``max_length`` (its start); the prompt keeps its END (the question and the assistant's header)."""
    turns_and_answers = [conversation(record) for record in records]
    texts = [_texts(tokenizer, turns, answer, f"{where}, example {i}")
             for i, (turns, answer) in enumerate(turns_and_answers, start=1)]
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    answers = tokenizer([a for _, a in texts], add_special_tokens=False)["input_ids"]
    rows = []
    for prompt_ids, answer_ids in zip(prompts, answers, strict=True):
        kept_answer = answer_ids[: max_length // 2]
        rows.append((prompt_ids[max(0, len(prompt_ids) + len(kept_answer) - max_length):], kept_answer))
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        tokens = torch.tensor(prompt + answer, dtype=torch.long)
        input_ids[i, :len(tokens)] = tokens
        attention_mask[i, :len(tokens)] = 1
        targets[i, len(prompt) - 1:len(tokens) - 1] = torch.tensor(answer, dtype=torch.long)  # next-token targets
    return EncodedChats(input_ids, attention_mask, targets, tuple(answer for _, answer in turns_and_answers),
                        tuple(turns[-1]["content"] for turns, _ in turns_and_answers))


def answer_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's summed answer-token loss, its answer-token count). The vocabulary projection runs only at
    the positions where some row predicts an answer token (``logits_to_keep``): most of a prompt needs none."""
    positions = (targets != IGNORE).any(0).nonzero().flatten()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
    kept = targets[:, positions]
    token_loss = F.cross_entropy(logits.transpose(1, 2).float(), kept, ignore_index=IGNORE, reduction="none")
    return token_loss.sum(1), (kept != IGNORE).sum(1)


def answer_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of each row's mean answer-token loss: what training minimises."""
    total, count = answer_losses(model, input_ids, attention_mask, targets)
    return (total / count.clamp(min=1)).mean()


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words (longest common subsequence)."""
    a, b = normalise(candidate).split(), normalise(reference).split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class GenerationScores:
    """Sums over a test set, and a few examples to show."""

    loss_sum: float
    answer_tokens: int
    exact: int
    rouge_sum: float
    examples: int
    samples: list[dict[str, str]] = field(default_factory=list)
    per_example: list[tuple[float, int, bool, float]] = field(default_factory=list)
    """Each example's (mean answer-token loss, answer tokens, exact match, ROUGE-L): what a site counts for
    federated evaluation (common.federated_eval)."""

    def metrics(self) -> dict[str, Any]:
        if self.examples == 0:
            return {"exact_match": float("nan"), "rouge_l": float("nan"), "loss": float("nan"),
                    "perplexity": float("nan"), "examples": 0, "samples": []}
        loss = self.loss_sum / max(1, self.answer_tokens)
        return {"exact_match": self.exact / self.examples, "rouge_l": self.rouge_sum / self.examples,
                "loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": self.examples,
                "samples": self.samples}


def _generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[torch.Tensor],
              max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of prompts (left-padded for generation)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = prompt
        attention_mask[i, width - len(prompt):] = 1
    device = next(model.parameters()).device
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


@torch.no_grad()
def score_generation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TensorDataset,
                     answers: tuple[str, ...], questions: tuple[str, ...], batch_size: int = 16) -> GenerationScores:
    """The answer-token loss (teacher forcing) and, from greedy generation, exact match and ROUGE-L."""
    model.eval()
    input_ids, attention_mask, targets = data.tensors
    loss_sum, tokens, exact, rouge = 0.0, 0, 0, 0.0
    samples: list[dict[str, str]] = []
    per_example: list[tuple[float, int, bool, float]] = []
    device = next(model.parameters()).device
    answer_lengths = (targets != IGNORE).sum(1)
    max_new = min(MAX_NEW_TOKENS, int(answer_lengths.max()) + 2) if len(answers) else 1
    for start in range(0, len(answers), batch_size):
        rows = slice(start, start + batch_size)
        total, count = answer_losses(model, input_ids[rows].to(device), attention_mask[rows].to(device),
                                     targets[rows].to(device))
        total, count = total.float().cpu(), count.cpu()
        loss_sum, tokens = loss_sum + float(total.sum()), tokens + int(count.sum())
        prompt_lengths = (targets[rows] != IGNORE).int().argmax(1) + 1  # the first answer token's position
        prompts = [input_ids[start + i, :int(n)] for i, n in enumerate(prompt_lengths)]
        for i, generated in enumerate(_generate(model, tokenizer, prompts, max_new)):
            reference = answers[start + i]
            matched, overlap = normalise(generated) == normalise(reference), rouge_l(generated, reference)
            exact, rouge = exact + matched, rouge + overlap
            per_example.append((float(total[i]) / max(1, int(count[i])), int(count[i]), matched, overlap))
            if len(samples) < SAMPLES_SHOWN:
                samples.append({"prompt": excerpt(questions[start + i]), "reference": excerpt(reference),
                                "generated": excerpt(generated)})
    return GenerationScores(loss_sum, tokens, exact, rouge, len(answers), samples, per_example)


def excerpt(text: str, limit: int = 240) -> str:
    """``text``, its middle elided past ``limit`` characters (a question's start and end both matter)."""
    return text if len(text) <= limit else text[: limit // 2] + " … " + text[-limit // 2:]


def most_common_answer_scores(answers: tuple[str, ...]) -> dict[str, float]:
    """What always giving the test split's most common answer scores: the floor to beat."""
    if not answers:
        return {"exact_match": float("nan"), "rouge_l": float("nan")}
    top = Counter(normalise(a) for a in answers).most_common(1)[0][0]
    return {"exact_match": float(np.mean([normalise(a) == top for a in answers])),
            "rouge_l": float(np.mean([rouge_l(top, a) for a in answers]))}
