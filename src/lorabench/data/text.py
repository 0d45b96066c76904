"""Raw text (C4-style documents) packed into fixed-length blocks, for pretraining and perplexity.

Each document is tokenized, an eos is appended, the streams are concatenated in order, and
the result is cut into blocks of exactly `task.max_length` tokens; the last partial block is
dropped (so every block is full and no padding is ever trained on). This is the packing of
ReLoRA's C4 runs and of HF's `run_clm` example. Blocks may span documents; the eos between
them marks the boundary. Train blocks come from the train split, eval blocks from the eval
split (or from a seeded holdout of the documents), so no block mixes the two.
"""

from __future__ import annotations

from typing import Any

from lorabench.data.hf import train_eval_tables
from lorabench.data.tokenizer import Tokenizer


def pack_blocks(docs: list[str], tok: Tokenizer, block: int, max_blocks: int) -> list[list[int]]:
    """Consecutive `block`-token pieces of the docs' token stream (doc + eos each); the remainder is dropped."""
    blocks: list[list[int]] = []
    buf: list[int] = []
    for doc in docs:
        buf += tok.encode(doc) + [tok.eos_id]
        while len(buf) >= block and len(blocks) < max_blocks:
            blocks.append(buf[:block])
            buf = buf[block:]
        if len(blocks) >= max_blocks:
            break
    return blocks


def load_text_blocks(cfg: Any, seed: int, tok: Tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(train, eval) blocks of `task.max_length` tokens; `task.train_size`/`eval_size` cap blocks, not documents."""
    train, evals = train_eval_tables(cfg, seed, {"task.text_field": cfg.text_field}, cap_rows=False)
    block = int(cfg.max_length)
    return (
        pack_blocks([str(t) for t in train[cfg.text_field]], tok, block, cfg.train_size),
        pack_blocks([str(t) for t in evals[cfg.text_field]], tok, block, cfg.eval_size),
    )
