"""Pretraining the tiny backbone: full-rank, on the synthetic corpus, through the same
`Trainer` (AdamW, warmup + cosine schedule, clipping) as every fine-tuning job.

`ensure_pretrained` writes the result once per recipe into the cache (atomically, under a
file lock, so parallel jobs wait for one pretraining); `lorabench-pretrain` runs it by hand.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from lorabench.backbone.tiny import cache_key, is_pretrained, pretrained_dir, tiny_llama_config
from lorabench.config import OptimConfig, TrainerConfig
from lorabench.data.synthetic import sample_corpus_example
from lorabench.data.tasks import TaskData
from lorabench.data.tokenizer import CharTokenizer
from lorabench.strategies.full import Full, FullConfig
from lorabench.training.trainer import Trainer

log = logging.getLogger(__name__)
HELD_OUT = 512  # corpus examples kept aside (drawn after the training ones)


def pretrain_tiny(cfg: Any, device: torch.device, progress: bool = True) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Train the tiny Llama of `cfg` (the `model.*` keys) from its seeded init; returns it and its record."""
    tok = CharTokenizer()
    torch.manual_seed(cfg.pretrain_seed)
    model = LlamaForCausalLM(tiny_llama_config(cfg, tok.vocab_size)).to(device)
    rng = random.Random(f"pretrain-{cfg.pretrain_seed}")
    fams = list(cfg.pretrain_families)
    examples = [sample_corpus_example(rng, fams) for _ in range(cfg.pretrain_steps * cfg.pretrain_batch_size)]
    held = [sample_corpus_example(rng, fams) for _ in range(HELD_OUT)]
    data = TaskData(examples, held, tok, cfg.pretrain_seed, loss_on="all", max_length=cfg.max_position_embeddings)
    optim = OmegaConf.structured(OptimConfig(
        lr=cfg.pretrain_lr, weight_decay=0.01, scheduler="cosine",
        warmup_steps=max(1, cfg.pretrain_steps // 30), min_lr_ratio=0.0, max_grad_norm=1.0,
    ))
    loop = OmegaConf.structured(TrainerConfig(
        max_steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size, eval_every=0, checkpoint_every=0,
        progress=progress,
    ))
    strategy = Full(FullConfig(lr=cfg.pretrain_lr))
    trainer = Trainer(strategy.wrap(model), strategy, data, optim, loop, device, generate=False,
                      desc="pretraining tiny backbone (cached after)")
    trainer.setup()
    t0 = time.time()
    loss = float("nan")
    while trainer.state.step < cfg.pretrain_steps:
        loss = trainer.train_step()["train/loss"]
    model.eval()
    record = {
        "pretrain_seconds": round(time.time() - t0, 1),
        "final_train_loss": round(float(loss), 4),
        "params": sum(p.numel() for p in model.parameters()),
    }
    log.info("pretrained tiny backbone: %s", record)
    return model, record


def ensure_pretrained(cfg: Any, device: torch.device) -> Path:
    """The pretrained dir of `cfg`, pretraining it first if no complete one exists."""
    target = pretrained_dir(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not is_pretrained(target):
            model, record = pretrain_tiny(cfg, device)
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True)
            CharTokenizer().save(tmp / "tokenizer.json")
            (tmp / "meta.json").write_text(json.dumps({"key": cache_key(cfg), **record}, indent=2))
            tmp.rename(target)  # atomic: a half-written dir is never visible under the key
    return target


def prepare_backbone(model_cfg: Any, device: torch.device) -> None:
    """Before loading: a pretrained tiny backbone must exist (others need nothing)."""
    if model_cfg.source == "tiny" and model_cfg.pretrain_steps > 0:
        ensure_pretrained(model_cfg, device)
