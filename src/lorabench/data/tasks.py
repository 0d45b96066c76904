"""A task = tokenized train/eval examples plus a deterministic batch for every step.

The batch of step t is a pure function of (seed, t), so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lorabench.data.synthetic import Example
from lorabench.data.tokenizer import Tokenizer
from lorabench.errors import ConfigError

log = logging.getLogger(__name__)


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
        parse_special: bool = False,
        add_bos: Optional[bool] = None,
        drop_long: bool = False,
    ) -> None:
        """`parse_special`: prompts hold real special tokens (a rendered chat template, which
        brings its own start). `add_bos`: start every prompt with bos (default: as the tokenizer
        itself does, and never under `parse_special`). `drop_long`: leave out examples longer
        than `max_length` (logged) instead of refusing the task."""
        if not train or not evals:
            raise ConfigError("task: produced an empty train or eval split; check task.train_size / task.eval_size")
        self.tok = tokenizer
        self.seed = seed
        self.loss_on = loss_on
        self.parse_special = parse_special
        self.add_bos = (getattr(tokenizer, "adds_bos", True) and not parse_special) if add_bos is None else add_bos
        self.train_examples, self.train = self._encode_all(train, max_length, drop_long, "train")
        self.eval_examples, self.eval = self._encode_all(evals, max_length, drop_long, "eval")
        self._perms: dict[int, torch.Tensor] = {}
        self.mc: Optional[Any] = None  # a multiple-choice eval set (lorabench.data.mc.MCSet), scored beside the split

    @classmethod
    def from_blocks(
        cls, train: list[list[int]], evals: list[list[int]], tokenizer: Tokenizer, seed: int
    ) -> "TaskData":
        """Language modelling on pre-tokenized fixed-length blocks (packed raw text): loss on every token."""
        if not train or not evals:
            raise ConfigError("task: packed no full block into the train or eval split; add text or lower task.max_length")
        data = cls.__new__(cls)
        data.tok, data.seed, data.loss_on, data.parse_special, data.add_bos = tokenizer, seed, "all", False, False
        data.train_examples, data.eval_examples = [], []  # blocks cut across documents: no prompt/answer pairs
        data.train = [Encoded(list(b), 0) for b in train]
        data.eval = [Encoded(list(b), 0) for b in evals]
        data._perms = {}
        data.mc = None
        return data

    def _encode_all(
        self, examples: list[Example], max_length: int, drop_long: bool, split: str
    ) -> tuple[list[Example], list[Encoded]]:
        """The examples kept and their encodings (all of them, unless `drop_long` drops the over-long)."""
        if not drop_long:
            return examples, [self._encode(e, max_length) for e in examples]
        kept = [(e, enc) for e in examples if len((enc := self._encode(e, None)).ids) <= max_length]
        if len(kept) < len(examples):
            log.info("task: dropped %d of %d %s examples longer than task.max_length=%d", len(examples) - len(kept), len(examples), split, max_length)
        if not kept:
            raise ConfigError(f"task.max_length: every {split} example is longer than {max_length} tokens")
        return [e for e, _ in kept], [enc for _, enc in kept]

    def _encode(self, ex: Example, max_length: Optional[int]) -> Encoded:
        p = [self.tok.bos_id] if self.add_bos else []
        p += self.tok.encode(ex.prompt, parse_special=self.parse_special)
        a = self.tok.encode(ex.answer) + [self.tok.eos_id]  # the answer is data, never special tokens
        if max_length is not None and len(p) + len(a) > max_length:
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
