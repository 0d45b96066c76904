"""`lorabench-pretrain`: rebuild a tiny backbone dir and compare it with the shipped one.

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
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from lorabench.backbone import tiny as tiny_backbone
from lorabench.backbone.tiny import RECORD, shipped_record
from lorabench.errors import ConfigError
from lorabench.training.pretrain import compare_with_shipped, pretrain_tiny, write_backbone_dir


def compose_model_cfg(overrides: list[str]) -> Any:
    """The `model` keys of the conf tree with `model.*` overrides (validated by the schema)."""
    from hydra import compose, initialize_config_dir

    from lorabench.checks import register_configs
    from lorabench.cli import conf_dir  # the one place that knows where conf/ lives (same layer)

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
