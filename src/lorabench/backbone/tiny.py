"""The embedded default backbone: a tiny Llama pretrained by this harness on its synthetic corpus.

No hub, no network: the architecture comes from a `LlamaConfig`, the tokenizer is the
synthetic character vocabulary, and the weights come from a short full-rank pretraining run
(`lorabench.training.pretrain`, through the same trainer as every fine-tuning job), kept in
a cache dir whose key hashes everything that determines the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorabench.data.synthetic import CORPUS_DIFFICULTY
from lorabench.data.tokenizer import VOCAB_VERSION, CharTokenizer
from lorabench.errors import ConfigError

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when the pretraining recipe below changes


def tiny_llama_config(cfg: Any, vocab_size: int) -> LlamaConfig:
    """The LlamaConfig of `model=tiny` (checks the widths that INT-N groups need)."""
    for key in ("hidden_size", "intermediate_size"):
        if getattr(cfg, key) % 64:
            raise ConfigError(f"model.{key}: expected a multiple of 64 (quantization groups), got {getattr(cfg, key)}")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.num_heads: must divide model.hidden_size={cfg.hidden_size}, got {cfg.num_heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def cache_key(cfg: Any) -> str:
    """Hash of everything that determines the pretrained weights."""
    fields = {
        k: getattr(cfg, k)
        for k in (
            "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_position_embeddings",
            "pretrain_steps", "pretrain_batch_size", "pretrain_lr", "pretrain_seed",
        )
    }
    fields["families"] = list(cfg.pretrain_families)
    fields["difficulty"] = {f: CORPUS_DIFFICULTY[f] for f in cfg.pretrain_families}
    fields["vocab"] = VOCAB_VERSION
    fields["format"] = CACHE_FORMAT
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def pretrained_dir(cfg: Any) -> Path:
    """Where the pretrained weights of `cfg` live (written by `lorabench.training.pretrain`)."""
    return Path(cfg.cache_dir).expanduser() / f"tiny-{cache_key(cfg)}"


def is_pretrained(path: Path) -> bool:
    """A complete pretrained dir (its `meta.json` is written last)."""
    return (path / "meta.json").exists()


def load_tiny(cfg: Any, seed: int, device: torch.device) -> tuple[LlamaForCausalLM, CharTokenizer]:
    """The tiny backbone: random (pretrain_steps=0, seeded by the run's seed) or pretrained."""
    tok = CharTokenizer()
    config = tiny_llama_config(cfg, tok.vocab_size)
    if cfg.pretrain_steps == 0:
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(device), tok
    path = pretrained_dir(cfg)
    if not is_pretrained(path):
        raise ConfigError(f"model: no pretrained tiny backbone at {path}; run `lorabench-pretrain` with these model keys")
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, tok
