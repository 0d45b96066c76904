"""Tasks: the synthetic suite (and its pretraining corpus) and HF datasets, behind one builder."""

from __future__ import annotations

from functools import partial
from typing import Any

from lorabench.data.synthetic import FAMILIES, make_splits, sample_corpus_example, sample_example
from lorabench.data.tasks import TaskData
from lorabench.data.tokenizer import CharTokenizer, HFTokenizer, Tokenizer
from lorabench.errors import ConfigError

SPECIAL_TASKS = ("corpus", "hf")


def validate_task(cfg: Any) -> None:
    """One-line errors for an unknown task, a bad family or bad sizes."""
    if cfg.name not in FAMILIES and cfg.name not in SPECIAL_TASKS:
        raise ConfigError(
            f"task.name: unknown task '{cfg.name}', expected one of {sorted(FAMILIES) + list(SPECIAL_TASKS)}"
        )
    for fam in cfg.families:
        if fam not in FAMILIES:
            raise ConfigError(f"task.families: unknown family '{fam}', expected among {sorted(FAMILIES)}")
    if cfg.difficulty_min < 1 or cfg.difficulty_max < cfg.difficulty_min:
        raise ConfigError(
            f"task.difficulty_min/max: expected 1 <= min <= max, got {cfg.difficulty_min}..{cfg.difficulty_max}"
        )
    if cfg.train_size <= 0 or cfg.eval_size <= 0:
        raise ConfigError("task.train_size/eval_size: expected positive sizes")


def build_task(cfg: Any, tokenizer: Tokenizer, seed: int) -> TaskData:
    """Generate (or load) the splits and tokenize them."""
    if cfg.name == "hf":
        from lorabench.data.hf import load_hf_examples

        train, evals = load_hf_examples(cfg, seed)
    else:
        if cfg.name == "corpus":
            sample = partial(sample_corpus_example, families=list(cfg.families))
        else:
            sample = partial(
                sample_example, family=cfg.name, dmin=cfg.difficulty_min, dmax=cfg.difficulty_max
            )
        train, evals = make_splits(lambda rng: sample(rng), cfg.train_size, cfg.eval_size, seed)
    return TaskData(train, evals, tokenizer, seed, cfg.loss_on, cfg.max_length)


__all__ = ["CharTokenizer", "HFTokenizer", "TaskData", "Tokenizer", "build_task", "validate_task"]
