"""Tokenizers: the embedded character vocabulary of the synthetic language, and HF tokenizers.

Both expose the same small surface (encode/decode, pad/bos/eos ids, vocab_size) so the
tasks and the evaluator never care which backbone they feed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

# Every character a synthetic task can emit. Index 0..2 are the special tokens.
SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz+-=:;,>|?. ")
VOCAB_VERSION = 1  # bump when CHARS changes: part of the tiny backbone cache key


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """One token per character; the tiny backbone's vocabulary."""

    def __init__(self) -> None:
        self.itos = SPECIALS + CHARS
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the synthetic vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"itos": self.itos, "version": VOCAB_VERSION}))


class HFTokenizer:
    """Adapts a transformers tokenizer to the same surface (no special tokens inside encode)."""

    def __init__(self, tok) -> None:  # noqa: ANN001 - any PreTrainedTokenizer
        self.tok = tok
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else self.eos_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
