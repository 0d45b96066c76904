"""Scoring: answer-token loss and accuracy (teacher-forced), exact match of greedy generation,
and multiple-choice accuracy from the answer letters' log-likelihoods.

Loss is continuous, so small differences between strategies show even where exact match
ties; exact match of the whole answer is the primary metric (`eval/accuracy`). A task with an
MMLU-format set (`task.mc_dataset`) also reports `eval/mc_accuracy`, scored as the QLoRA and
QA-LoRA papers score MMLU: the choice whose letter continuation is most likely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.data.mc import MCSet
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
    if getattr(data, "mc", None) is not None:
        out["mc_accuracy"] = mc_accuracy(model, data.mc, batch_size, data.tok.pad_id, device)
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


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module, rows: list[tuple[list[int], int]], batch_size: int, pad_id: int, device: torch.device
) -> list[float]:
    """For each (ids, n): the summed log-probability of the last n tokens of ids given the ones before."""
    out: list[float] = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (seq, _) in enumerate(chunk):  # right padding: positions count from 0 in every row
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
        for r, (seq, n) in enumerate(chunk):
            pos = torch.arange(len(seq) - n, len(seq), device=logp.device)  # the continuation's positions
            targets = torch.tensor(seq[len(seq) - n :], device=logp.device)
            out.append(float(logp[r, pos - 1, targets].sum()))
    return out


@torch.no_grad()
def mc_choice_scores(model: nn.Module, mc: MCSet, batch_size: int, pad_id: int, device: torch.device) -> list[list[float]]:
    """Per item, the log-likelihood of each choice's letter continuation after the prompt.

    One-token letters (" A" in BPE vocabularies) are read off one forward of the prompt, at its
    last position; longer continuations get one sequence per choice.
    """
    was_training = model.training
    model.eval()
    if all(len(o) == 1 for item in mc.items for o in item.options):
        scores = []
        for s in range(0, len(mc.items), batch_size):
            chunk = mc.items[s : s + batch_size]
            width = max(len(it.context) for it in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, it in enumerate(chunk):
                ids[r, : len(it.context)] = torch.tensor(it.context)
                mask[r, : len(it.context)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            for r, it in enumerate(chunk):
                logp = logits[r, len(it.context) - 1].log_softmax(-1)
                scores.append([float(logp[o[0]]) for o in it.options])
    else:
        rows = [(it.context + o, len(o)) for it in mc.items for o in it.options]
        flat = iter(continuation_logprobs(model, rows, batch_size, pad_id, device))
        scores = [[next(flat) for _ in it.options] for it in mc.items]
    model.train(was_training)
    return scores


def mc_accuracy(model: nn.Module, mc: MCSet, batch_size: int, pad_id: int, device: torch.device) -> float:
    """Fraction of items whose most likely letter is the right one (ties: the first letter)."""
    scores = mc_choice_scores(model, mc, batch_size, pad_id, device)
    right = sum(int(max(range(len(sc)), key=sc.__getitem__) == it.gold) for sc, it in zip(scores, mc.items))
    return right / len(mc.items)
