"""Scoring: answer-token loss and accuracy (teacher-forced) and exact match of greedy generation.

Loss is continuous, so small differences between strategies show even where exact match
ties; exact match of the whole answer is the primary metric (`eval/accuracy`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.data.tasks import TaskData


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TaskData, batch_size: int, device: torch.device, generate: bool = True
) -> dict[str, float]:
    """{loss, perplexity, token_accuracy, accuracy?} over the whole eval split."""
    was_training = model.training
    model.eval()
    loss_sum, n_tok, n_right = 0.0, 0, 0
    for batch, _ in data.eval_batches(batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum").item()
        keep = labels != -100
        n_tok += int(keep.sum())
        n_right += int(((logits.argmax(-1) == labels) & keep).sum())
    loss = loss_sum / max(1, n_tok)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": n_right / max(1, n_tok)}
    if generate:
        out["accuracy"] = exact_match(model, data, batch_size, device)
    model.train(was_training)
    return out


@torch.no_grad()
def exact_match(model: nn.Module, data: TaskData, batch_size: int, device: torch.device) -> float:
    """Fraction of eval prompts whose greedy continuation (up to eos) equals the answer."""
    tok = data.tok
    budget = data.max_answer_tokens()
    right = 0
    for s in range(0, len(data.eval), batch_size):
        chunk = data.eval[s : s + batch_size]
        examples = data.eval_examples[s : s + batch_size]
        prompts = [e.ids[: e.n_prompt] for e in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding, so every row generates from its last column
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
        )[:, width:]
        for row, ex in zip(gen.tolist(), examples):
            if tok.eos_id in row:
                row = row[: row.index(tok.eos_id)]
            right += int(tok.decode(row) == ex.answer)
    return right / len(data.eval)
