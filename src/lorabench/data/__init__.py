"""Tasks: the synthetic suite (its pretraining corpus, a fact table to memorize) and HF datasets (prompt/answer,
Alpaca instructions, packed raw text, an optional MMLU-format MC eval set), behind one builder."""

from __future__ import annotations

from functools import partial
from typing import Any

from lorabench.data.synthetic import FAMILIES, make_splits, sample_corpus_example, sample_example
from lorabench.data.tasks import TaskData
from lorabench.data.tokenizer import CharTokenizer, HFTokenizer, Tokenizer
from lorabench.errors import ConfigError

SPECIAL_TASKS = ("corpus", "facts", "hf", "instruct", "text")


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
    if cfg.name == "text" and cfg.generate:
        raise ConfigError("task.generate: packed text is scored by perplexity only; set task.generate=false")
    if cfg.name == "facts":
        from lorabench.data.facts import check_fact_config

        check_fact_config(cfg)
    if cfg.get("mc_shots", 0) < 0 or cfg.get("mc_size", 0) < 0:
        raise ConfigError("task.mc_shots/mc_size: expected sizes >= 0")


def build_task(cfg: Any, tokenizer: Tokenizer, seed: int) -> TaskData:
    """Generate (or load) the splits and tokenize them; attach the MC eval set if one is configured."""
    data = _build_splits(cfg, tokenizer, seed)
    if cfg.get("mc_dataset"):
        from lorabench.data.mc import load_mc

        data.mc = load_mc(cfg, tokenizer)
    return data


def _build_splits(cfg: Any, tokenizer: Tokenizer, seed: int) -> TaskData:
    parse_special = False
    if cfg.name == "text":
        from lorabench.data.text import load_text_blocks

        return TaskData.from_blocks(*load_text_blocks(cfg, seed, tokenizer), tokenizer, seed)
    if cfg.name == "hf":
        from lorabench.data.hf import load_hf_examples

        train, evals = load_hf_examples(cfg, seed)
    elif cfg.name == "facts":
        from lorabench.data.facts import load_fact_examples

        train, evals = load_fact_examples(cfg, seed)
    elif cfg.name == "instruct":
        from lorabench.data.instruct import load_instruct_examples

        train, evals = load_instruct_examples(cfg, seed, getattr(tokenizer, "tok", None))
        parse_special = cfg.template == "chat"  # the rendered template holds the model's real special tokens
    else:
        if cfg.name == "corpus":
            sample = partial(sample_corpus_example, families=list(cfg.families))
        else:
            sample = partial(
                sample_example, family=cfg.name, dmin=cfg.difficulty_min, dmax=cfg.difficulty_max
            )
        train, evals = make_splits(lambda rng: sample(rng), cfg.train_size, cfg.eval_size, seed)
    return TaskData(train, evals, tokenizer, seed, cfg.loss_on, cfg.max_length, parse_special=parse_special,
                    drop_long=cfg.get("drop_long", False))


__all__ = ["CharTokenizer", "HFTokenizer", "TaskData", "Tokenizer", "build_task", "validate_task"]
