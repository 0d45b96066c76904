"""The embedded default backbone: a tiny Llama pretrained by this harness on its synthetic corpus.

No hub, no network. The default recipe's weights ship inside the package
(`tiny_default/`: a standard Hugging Face model dir with its tokenizer), so every machine
fine-tunes exactly the same starting weights: pretraining depends on the machine's float
rounding, and a backbone pretrained locally would move every fine-tuning result. The shipped
files are checked against the sha256 recorded beside them before they are loaded.

Other tiny recipes (other sizes or pretraining keys) are pretrained by
`lorabench.training.pretrain` and kept in a cache dir whose key hashes everything that
determines the weights; `pretrain_steps=0` is a seeded random init.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorabench.data.synthetic import CORPUS_DIFFICULTY
from lorabench.data.tokenizer import VOCAB_VERSION, CharTokenizer, HFTokenizer, Tokenizer
from lorabench.errors import ConfigError

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when the pretraining recipe (lorabench.training.pretrain) changes
SHIPPED_DIR = Path(__file__).with_name("tiny_default")  # the default recipe's backbone (package data)
RECORD = "lorabench_backbone.json"  # written last into a backbone dir: recipe, losses, sha256 of every file
LEGACY_RECORD = "meta.json"  # the record of cache dirs written before RECORD existed
REBUILD = "lorabench-pretrain --ship"  # the command that rebuilds the shipped files


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


def recipe(cfg: Any) -> dict[str, Any]:
    """Everything that determines the pretrained weights (the model keys, corpus and vocabulary)."""
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
    return fields


def cache_key(cfg: Any) -> str:
    """Hash of the recipe: names the cache dir and identifies the shipped backbone."""
    blob = json.dumps(recipe(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def pretrained_dir(cfg: Any) -> Path:
    """Where the pretrained weights of a non-shipped recipe live (written by `lorabench.training.pretrain`)."""
    return Path(cfg.cache_dir).expanduser() / f"tiny-{cache_key(cfg)}"


def is_pretrained(path: Path) -> bool:
    """A complete pretrained dir (its record is written last)."""
    return (path / RECORD).exists() or (path / LEGACY_RECORD).exists()


def shipped_record(shipped: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """The record of the shipped backbone (None when the package holds none)."""
    path = (shipped or SHIPPED_DIR) / RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model: shipped backbone record {path} is not valid JSON ({e}); rebuild it with `{REBUILD}`") from None


def is_shipped(cfg: Any) -> bool:
    """Whether the model keys of `cfg` are the shipped recipe (so no pretraining is needed)."""
    if cfg.source != "tiny" or cfg.pretrain_steps == 0:
        return False
    record = shipped_record()
    return record is not None and record.get("key") == cache_key(cfg)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(path: Path, record: dict[str, Any]) -> None:
    """Every file the record lists exists with its recorded sha256, else one line naming it."""
    for name, expected in sorted(record["sha256"].items()):
        f = path / name
        if not f.is_file():
            raise ConfigError(f"model: shipped backbone file {f} is missing; reinstall lorabench or rebuild it with `{REBUILD}`")
        got = sha256_file(f)
        if got != expected:
            raise ConfigError(
                f"model: shipped backbone file {f} is corrupted or truncated ({f.stat().st_size} bytes, sha256 "
                f"{got[:16]}..., expected {expected[:16]}...); reinstall lorabench or rebuild it with `{REBUILD}`"
            )


def tiny_weights(cfg: Any) -> tuple[Optional[Path], Tokenizer]:
    """The dir holding the tiny backbone's weights (None: a seeded random init) and its tokenizer.

    The shipped files are checked against their recorded sha256 first.
    """
    if is_shipped(cfg):
        record = shipped_record()
        if record is None:
            raise ConfigError(f"model: no shipped backbone in {SHIPPED_DIR}; rebuild it with `{REBUILD}`")
        verify_files(SHIPPED_DIR, record)
        return SHIPPED_DIR, HFTokenizer(AutoTokenizer.from_pretrained(SHIPPED_DIR))
    tok = CharTokenizer(cfg.max_position_embeddings)
    tiny_llama_config(cfg, tok.vocab_size)  # refuses widths the quantization groups cannot split
    if cfg.pretrain_steps == 0:
        return None, tok
    path = pretrained_dir(cfg)
    if not is_pretrained(path):
        raise ConfigError(
            f"model: no pretrained tiny backbone at {path}; a `lorabench` job pretrains it first "
            "(lorabench.training.pretrain.prepare_backbone)"
        )
    return path, tok


def load_tiny(cfg: Any, seed: int, device: torch.device) -> tuple[LlamaForCausalLM, Tokenizer]:
    """The tiny backbone in fp32: random (pretrain_steps=0, seeded by the run's seed), shipped, or cached."""
    path, tok = tiny_weights(cfg)
    if path is None:
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(cfg, tok.vocab_size)).to(device), tok
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device), tok
