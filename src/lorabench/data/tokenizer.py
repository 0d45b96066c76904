"""Tokenizers: the embedded character vocabulary of the synthetic language, as a Hugging Face
tokenizer, behind the small surface the tasks use.

The tiny backbone's tokenizer is a standard `tokenizers` pipeline (one token per character,
a WordLevel vocabulary, a fusing decoder) wrapped in a `PreTrainedTokenizerFast`, so it is
saved with `save_pretrained` and loads with `AutoTokenizer.from_pretrained` next to the
weights. Its ids are the historical ones (specials, then CHARS in order): the shipped weights
are only valid with exactly these ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from transformers import PreTrainedTokenizerFast

from lorabench.errors import ConfigError
from lorabench.utils import atomic_write_text

# Every character a synthetic task can emit. Index 0..2 are the special tokens.
SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz+-=:;,>|?. ")
VOCAB_VERSION = 1  # bump when CHARS changes: part of the tiny backbone cache key
# transformers 5 saves its fast tokenizers as "TokenizersBackend", a name transformers 4 does
# not know; "PreTrainedTokenizerFast" loads the same tokenizer.json under both.
PORTABLE_CLASS = "PreTrainedTokenizerFast"


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int
    adds_bos: bool

    def encode(self, text: str, parse_special: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def char_tokenizer_fast(model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """The synthetic character vocabulary as a Hugging Face fast tokenizer.

    Every character is its own pre-token (spaces included: no normalizer, no whitespace
    splitting), looked up in a WordLevel vocabulary with no unknown token, so a character
    outside the vocabulary is an error rather than a silent <unk>. `Fuse` joins decoded tokens
    with nothing between them, and tokenization-space clean-up is off, so decode(encode(s)) == s.
    With special tokens on (HF's default) a sequence starts with <bos>, as in training.
    """
    itos = SPECIALS + CHARS
    backend = BackendTokenizer(models.WordLevel({t: i for i, t in enumerate(itos)}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        clean_up_tokenization_spaces=False, model_max_length=model_max_length,
    )


def save_portable(tok: PreTrainedTokenizerFast, path: Path) -> list[str]:
    """`save_pretrained` into `path`, with the tokenizer class named portably; the file names."""
    files = [Path(f).name for f in tok.save_pretrained(str(path))]
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = PORTABLE_CLASS
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return sorted(set(files))


class HFTokenizer:
    """Adapts a transformers tokenizer to the tasks' surface (no special tokens inside encode)."""

    def __init__(self, tok: Any) -> None:  # any PreTrainedTokenizer(Fast)
        self.tok = tok
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else self.eos_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tok)
        # whether the tokenizer itself starts a sequence with bos (Llama, the char vocabulary: yes;
        # SmolLM2: no); prompts follow the model's own convention
        self.adds_bos = tok.bos_token_id is not None and tok.encode("a")[:1] == [tok.bos_token_id]

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """Ids of `text`, no bos/eos added. Text is data: a literal "<eos>" in it is characters,
        not the special token, unless `parse_special` (a rendered chat template holds real ones)."""
        try:
            return self.tok.encode(text, add_special_tokens=False, split_special_tokens=not parse_special)
        except Exception:  # tokenizers raises a bare Exception for a piece missing from its vocabulary
            vocab = self.tok.get_vocab()
            bad = next((c for c in text if c not in vocab), None)
            if bad is None:
                raise
            raise ConfigError(f"task: character {bad!r} is not in the vocabulary of the model's tokenizer") from None

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class CharTokenizer(HFTokenizer):
    """The tiny backbone's tokenizer, built in code (`char_tokenizer_fast`) rather than loaded."""

    def __init__(self, model_max_length: int = 128) -> None:
        super().__init__(char_tokenizer_fast(model_max_length))
