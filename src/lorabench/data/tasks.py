"""A task = tokenized train/eval examples plus a deterministic batch for every step.

The batch of step t is a pure function of (seed, t), so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorabench.data.synthetic import Example
from lorabench.data.tokenizer import Tokenizer
from lorabench.errors import ConfigError


@dataclass
class Encoded:
    ids: list[int]  # bos + prompt + answer + eos
    n_prompt: int  # bos + prompt tokens (no loss there when loss_on=answer)


class TaskData:
    """Tokenized splits and the batching rules of one task."""

    def __init__(
        self,
        train: list[Example],
        evals: list[Example],
        tokenizer: Tokenizer,
        seed: int,
        loss_on: str = "answer",
        max_length: int = 128,
    ) -> None:
        if not train or not evals:
            raise ConfigError("task: produced an empty train or eval split; check task.train_size / task.eval_size")
        self.tok = tokenizer
        self.seed = seed
        self.loss_on = loss_on
        self.train_examples = train
        self.eval_examples = evals
        self.train = [self._encode(e, max_length) for e in train]
        self.eval = [self._encode(e, max_length) for e in evals]
        self._perms: dict[int, torch.Tensor] = {}

    def _encode(self, ex: Example, max_length: int) -> Encoded:
        p = [self.tok.bos_id] + self.tok.encode(ex.prompt)
        a = self.tok.encode(ex.answer) + [self.tok.eos_id]
        if len(p) + len(a) > max_length:
            raise ConfigError(
                f"task.max_length: an example needs {len(p) + len(a)} tokens, more than {max_length}"
            )
        return Encoded(p + a, len(p))

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.train), generator=g)}
        return self._perms[epoch]

    def train_batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Micro-batch number `index` (step * grad_accum + micro) of the seeded epoch shuffle."""
        n = len(self.train)
        items = []
        for j in range(batch_size):
            i = index * batch_size + j
            items.append(self.train[int(self._perm(i // n)[i % n])])
        return self.collate(items)

    def collate(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded ids, attention mask, and labels (-100 where no loss is taken)."""
        width = max(len(e.ids) for e in items)
        ids = torch.full((len(items), width), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for r, e in enumerate(items):
            L = len(e.ids)
            ids[r, :L] = torch.tensor(e.ids)
            mask[r, :L] = 1
            start = 1 if self.loss_on == "all" else e.n_prompt
            labels[r, start:L] = ids[r, start:L]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def eval_batches(self, batch_size: int) -> Any:
        """Teacher-forced eval batches in order, with the examples they hold."""
        for s in range(0, len(self.eval), batch_size):
            chunk = self.eval[s : s + batch_size]
            yield self.collate(chunk), self.eval_examples[s : s + batch_size]

    def max_answer_tokens(self) -> int:
        """Longest answer (with eos) in the eval split: the generation budget."""
        return max(len(e.ids) - e.n_prompt for e in self.eval)
