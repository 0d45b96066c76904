"""Helpers shared by the tests: tiny models, the real config tree, tiny jobs and trainers.

(Fixtures live in conftest.py; these are plain functions any test module imports.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from transformers import LlamaConfig, LlamaForCausalLM

from lorabench.checks import register_configs, validate

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A 2-layer, 64-wide Llama with a random init and a small task: a run takes seconds.
TINY = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.pretrain_steps=0",
    "task.train_size=256",
    "task.eval_size=16",
    "task.difficulty_min=3",
    "task.difficulty_max=5",
    "trainer.max_steps=6",
    "trainer.batch_size=8",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "trainer.log_every=1",
    "trainer.device=cpu",
    "logger=none",
]


def tiny_llama(
    seed: int = 0, hidden: int = 64, inter: int = 128, layers: int = 2, *,
    vocab: int = 48, heads: int = 4, max_pos: int = 64, tie: bool = False,
) -> LlamaForCausalLM:
    """A seeded random Llama small enough for unit tests (built from a config: no hub)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def build_on_tiny(name: str, **keys: Any) -> tuple[Any, LlamaForCausalLM]:
    """(strategy, wrapped model) in the trainer's order: base_format → quantize → seed → wrap.

    Only the keys given are set (plus lr); every other key keeps its dataclass default.
    """
    from lorabench.strategies import build_strategy
    from lorabench.training.job import wrap_model

    strategy = build_strategy({"name": name, "lr": 1e-2, **keys}, seed=0)
    return strategy, wrap_model(strategy, tiny_llama(), seed=1)


def compose_cfg(*overrides: str) -> DictConfig:
    """The real config tree with `overrides`, as `lorabench <overrides>` would see it."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def tiny_cfg(run_dir: Optional[Path], *overrides: str) -> DictConfig:
    """The validated config of a tiny job writing into `run_dir`."""
    cfg = compose_cfg(*TINY, *overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir or ".")
    validate(cfg)
    return cfg


def run_tiny(run_dir: Path, *overrides: str) -> dict[str, Any]:
    """Validate and train a tiny job into `run_dir`; returns its summary."""
    from lorabench.training import job

    return job.run(tiny_cfg(run_dir, *overrides))


def tiny_trainer(run_dir: Optional[Path], *overrides: str, setup: bool = True) -> Any:
    """The job's Trainer for a tiny config, driven step by step with `train_step()`
    (with `run_dir`, `setup()` resumes from its checkpoint)."""
    from lorabench.training.job import build_trainer

    trainer = build_trainer(tiny_cfg(run_dir, *overrides), torch.device("cpu"), run_dir=run_dir)
    if setup:
        trainer.setup()
    return trainer


def wait_for(event: Callable[[], bool], proc: Any, what: str) -> None:
    """Wait until `event()` holds while `proc` runs; fail if it exits first. No wall-clock budget:
    a busy machine only makes it later (the `spawn` fixture kills the child whatever happens)."""
    import time

    while not event():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited (rc {proc.returncode}) before {what}")
        time.sleep(0.1)


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl's training rows (a torn last line, mid-write, is not one yet)."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in row:
            steps.append(row["step"])
    return steps


def wait_for_exit(proc: Any, run_dir: Path, since_step: int, steps: int = 3) -> int:
    """Wait for `proc` to exit, measured in training steps rather than seconds: fail if it logs
    more than `steps` steps past `since_step` first (it did not stop). Returns the exit code."""
    import time

    while proc.poll() is None:
        done = logged_steps(run_dir)
        if done and max(done) > since_step + steps:
            raise AssertionError(f"still training at step {max(done)}, {steps}+ steps after the signal (step {since_step})")
        time.sleep(0.1)
    return proc.returncode
