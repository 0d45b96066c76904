"""The embedded default backbone: a tiny Llama the harness pretrains itself, then caches.

No hub, no network: the architecture comes from a `LlamaConfig`, the tokenizer is the
synthetic character vocabulary, and the weights come from a short full-rank pretraining
run on the synthetic corpus. The cache key hashes everything that determines the weights,
so a changed setting never reuses a stale backbone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from lorabench.data.synthetic import CORPUS_DIFFICULTY, sample_corpus_example
from lorabench.data.tasks import TaskData
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


def load_tiny(cfg: Any, seed: int, device: torch.device) -> tuple[LlamaForCausalLM, CharTokenizer]:
    """The tiny backbone: random (pretrain_steps=0, seeded by the run's seed) or pretrained and cached."""
    tok = CharTokenizer()
    config = tiny_llama_config(cfg, tok.vocab_size)
    if cfg.pretrain_steps == 0:
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(device), tok
    cache_root = Path(cfg.cache_dir).expanduser()
    target = cache_root / f"tiny-{cache_key(cfg)}"
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "meta.json").exists():
            model = pretrain_tiny(cfg, config, tok, device)
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save(tmp / "tokenizer.json")
            (tmp / "meta.json").write_text(json.dumps({"key": cache_key(cfg), **model._pretrain_meta}, indent=2))
            tmp.rename(target)  # atomic: a half-written cache dir is never visible under the key
    model = LlamaForCausalLM.from_pretrained(target, dtype=torch.float32).to(device)
    return model, tok


def pretrain_tiny(cfg: Any, config: LlamaConfig, tok: CharTokenizer, device: torch.device) -> LlamaForCausalLM:
    """Full-rank pretraining on the synthetic corpus (seeded, AdamW, warmup + cosine)."""
    torch.manual_seed(cfg.pretrain_seed)
    model = LlamaForCausalLM(config).to(device)
    rng = random.Random(f"pretrain-{cfg.pretrain_seed}")
    fams = list(cfg.pretrain_families)
    n = cfg.pretrain_steps * cfg.pretrain_batch_size
    examples = [sample_corpus_example(rng, fams) for _ in range(n)]
    held = [sample_corpus_example(rng, fams) for _ in range(512)]
    data = TaskData(examples, held, tok, cfg.pretrain_seed, loss_on="all", max_length=cfg.max_position_embeddings)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    warm = max(1, cfg.pretrain_steps // 30)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.pretrain_steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.time()
    bar = tqdm(range(cfg.pretrain_steps), desc="pretraining tiny backbone (cached after)", leave=False)
    loss = torch.tensor(float("nan"))
    for step in bar:
        batch = {k: v.to(device) for k, v in data.train_batch(step, cfg.pretrain_batch_size).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model._pretrain_meta = {
        "pretrain_seconds": round(time.time() - t0, 1),
        "final_train_loss": round(float(loss.item()), 4),
        "params": sum(p.numel() for p in model.parameters()),
    }
    log.info("pretrained tiny backbone: %s", model._pretrain_meta)
    return model
