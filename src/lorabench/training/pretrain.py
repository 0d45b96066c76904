"""Pretraining the tiny backbone: full-rank, on the synthetic corpus, through the same
`Trainer` (AdamW, warmup + cosine schedule, clipping) as every fine-tuning job.

The default recipe's result ships with the package (`lorabench/backbone/tiny_default/`), so
no run pretrains it; `ensure_pretrained` pretrains any other recipe once into the cache
(atomically, under a file lock, so parallel jobs wait for one pretraining).

The `lorabench-pretrain` command rebuilds a backbone dir and compares it with the shipped one:

    lorabench-pretrain --out DIR [--steps N] [--threads 1] [model.KEY=VALUE ...]
    lorabench-pretrain --ship

It composes the model keys from the conf tree (with Hydra-style `model.*` overrides), pretrains
on `--threads` CPU threads (1 by default, as the shipped backbone was: the result depends on the
float rounding, hence on the thread count and CPU), writes a standard Hugging Face model dir
(config.json, model.safetensors, tokenizer files) plus `lorabench_backbone.json` (the recipe and
its key, the final and early training losses, the sha256 of every file) into DIR, and prints the
rebuilt and shipped losses and their difference. `--steps N` stops after the first N steps of
the recipe (same schedule) and compares the early losses only. `--ship` rebuilds the conf tree's
default recipe into the package dir, replacing the shipped files.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from filelock import FileLock
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers import LlamaForCausalLM

from lorabench.backbone import tiny as tiny_backbone
from lorabench.backbone.tiny import (
    RECORD, cache_key, is_pretrained, is_shipped, pretrained_dir, recipe, sha256_file,
    shipped_record, tiny_llama_config,
)
from lorabench.config import OptimConfig, TrainerConfig
from lorabench.data.synthetic import sample_corpus_example
from lorabench.data.tasks import TaskData
from lorabench.data.tokenizer import CharTokenizer, save_portable
from lorabench.errors import ConfigError
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


def compose_model_cfg(overrides: list[str]) -> Any:
    """The `model` keys of the conf tree with `model.*` overrides (validated by the schema)."""
    from hydra import compose, initialize_config_dir

    from lorabench.checks import register_configs
    from lorabench.cli import conf_dir  # the one place that knows where conf/ lives

    for o in overrides:
        if not o.startswith("model."):
            raise ConfigError(f"lorabench-pretrain: expected model.KEY=VALUE overrides, got '{o}'")
    register_configs()
    try:
        with initialize_config_dir(conf_dir(), version_base="1.3"):
            model = compose("config", overrides=["model=tiny", *overrides]).model
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"lorabench-pretrain: {first}") from None
    if model.pretrain_steps <= 0:
        raise ConfigError(f"model.pretrain_steps: expected a positive number of steps to pretrain, got {model.pretrain_steps}")
    return model


def main(argv: Optional[list[str]] = None) -> int:
    """`lorabench-pretrain`: rebuild a tiny backbone dir and compare it with the shipped one."""
    p = argparse.ArgumentParser(prog="lorabench-pretrain", description="Rebuild the tiny backbone (see lorabench.training.pretrain).")
    p.add_argument("overrides", nargs="*", help="model.KEY=VALUE overrides of the conf tree's model=tiny")
    p.add_argument("--out", type=Path, help="write the rebuilt backbone dir here")
    p.add_argument("--ship", action="store_true", help="rebuild the default recipe into the package dir (replaces the shipped files)")
    p.add_argument("--steps", type=int, help="stop after the first N steps of the recipe (compares early losses only)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shipped backbone used 1)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.ship == (args.out is not None):
            raise ConfigError("lorabench-pretrain: give exactly one of --out DIR or --ship")
        if args.ship and (args.overrides or args.steps is not None):
            raise ConfigError("lorabench-pretrain --ship: only the conf tree's full default recipe ships (no overrides, no --steps)")
        if args.threads < 1:
            raise ConfigError(f"--threads: expected a positive thread count, got {args.threads}")
        if args.out is not None and args.out.exists() and any(args.out.iterdir()) and not (args.out / RECORD).exists():
            raise ConfigError(f"--out: {args.out} exists and is not a backbone dir (no {RECORD}); give a new or empty dir")
        cfg = compose_model_cfg(args.overrides)
        torch.set_num_threads(args.threads)
        model, record = pretrain_tiny(cfg, torch.device("cpu"), steps=args.steps)
        target = tiny_backbone.SHIPPED_DIR if args.ship else args.out
        shipped = shipped_record()  # read before --ship replaces it
        write_backbone_dir(model, record, target, cfg.max_position_embeddings)
    except ConfigError as e:
        print(f"lorabench-pretrain: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {target} (recipe key {record['key']}, {record['steps']} steps, {record['pretrain_seconds']} s)")
    for line in compare_with_shipped(record, shipped):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
