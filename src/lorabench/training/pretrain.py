"""Pretraining the tiny backbone: full-rank, on the synthetic corpus, through the same
`Trainer` (AdamW, warmup + cosine schedule, clipping) as every fine-tuning job.

The default recipe's result ships with the package (`lorabench/backbone/tiny_default/`), so
no run pretrains it; `ensure_pretrained` pretrains any other recipe once into the cache
(atomically, under a file lock, so parallel jobs wait for one pretraining).

The `lorabench-pretrain` command (`lorabench.pretrain_cli`) rebuilds a backbone dir with these
functions and compares it with the shipped one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from filelock import FileLock
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from lorabench.backbone.tiny import (
    RECORD, cache_key, is_pretrained, is_shipped, pretrained_dir, recipe, sha256_file,
    tiny_llama_config,
)
from lorabench.config import OptimConfig, TrainerConfig
from lorabench.data.synthetic import sample_corpus_example
from lorabench.data.tasks import TaskData
from lorabench.data.tokenizer import CharTokenizer, save_portable
from lorabench.strategies.full import Full, FullConfig
from lorabench.training.trainer import Trainer
from lorabench.utils import atomic_write_text

log = logging.getLogger(__name__)
HELD_OUT = 512  # corpus examples kept aside (drawn after the training ones)
EARLY_STEPS = 50  # training losses recorded per step for the quick rebuild check


def pretrain_tiny(
    cfg: Any, device: torch.device, progress: bool = True, steps: Optional[int] = None,
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Train the tiny Llama of `cfg` (the `model.*` keys) from its seeded init; returns it and its record.

    `steps` stops after that many steps of the same recipe (the schedule still spans
    `pretrain_steps`), for checking the early losses without the full run.
    """
    stop = cfg.pretrain_steps if steps is None else min(steps, cfg.pretrain_steps)
    tok = CharTokenizer(cfg.max_position_embeddings)
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
                      desc="pretraining tiny backbone")
    trainer.setup()
    t0 = time.time()
    losses: list[float] = []
    while trainer.state.step < stop:
        losses.append(float(trainer.train_step()["train/loss"]))
    model.eval()
    record = {
        "key": cache_key(cfg),
        "recipe": recipe(cfg),
        "steps": stop,
        "pretrain_seconds": round(time.time() - t0, 1),
        "final_train_loss": round(losses[-1], 4) if losses else None,
        "early_losses": [round(x, 6) for x in losses[:EARLY_STEPS]],
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    log.info("pretrained tiny backbone: %s", {k: record[k] for k in ("key", "steps", "pretrain_seconds", "final_train_loss")})
    return model, record


def write_backbone_dir(model: LlamaForCausalLM, record: dict[str, Any], target: Path, max_length: int) -> None:
    """A standard HF model dir (weights, config, tokenizer) plus the record, swapped in atomically.

    Everything is written into a sibling temp dir, the record last (with the sha256 of every
    other file), then renamed over `target`: a half-written dir is never visible there.
    """
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_portable(CharTokenizer(max_length).tok, tmp)
    shas = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    atomic_write_text(tmp / RECORD, json.dumps({**record, "sha256": shas}, indent=2) + "\n")
    for p in tmp.iterdir():
        p.chmod(0o644)  # atomic writes create 0600 files; package data must be readable by all
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def ensure_pretrained(cfg: Any, device: torch.device) -> Path:
    """The cached pretrained dir of a non-shipped recipe, pretraining it first if no complete one exists."""
    target = pretrained_dir(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not is_pretrained(target):
            model, record = pretrain_tiny(cfg, device)
            write_backbone_dir(model, record, target, cfg.max_position_embeddings)
    return target


def prepare_backbone(model_cfg: Any, device: torch.device) -> None:
    """Before loading: a pretrained tiny backbone must exist (the shipped one, random inits and hf need nothing)."""
    if model_cfg.source == "tiny" and model_cfg.pretrain_steps > 0 and not is_shipped(model_cfg):
        ensure_pretrained(model_cfg, device)


def compare_with_shipped(record: dict[str, Any], shipped: Optional[dict[str, Any]]) -> list[str]:
    """Lines comparing a rebuilt record's losses with the shipped backbone's (same recipe only)."""
    if shipped is None or shipped.get("key") != record["key"]:
        return [f"no shipped backbone with recipe key {record['key']}: nothing to compare"]
    n = min(len(record["early_losses"]), len(shipped["early_losses"]))
    diffs = [abs(a - b) for a, b in zip(record["early_losses"][:n], shipped["early_losses"][:n])]
    lines = [f"early losses (steps 1..{n}): max |rebuilt - shipped| = {max(diffs):.2e}" if n else "no early losses to compare"]
    if record["steps"] == shipped["recipe"]["pretrain_steps"]:
        a, b = record["final_train_loss"], shipped["final_train_loss"]
        lines.append(f"final train loss: rebuilt {a:.4f}, shipped {b:.4f}, difference {a - b:+.4f}")
    return lines
