"""Prompt/answer examples from a Hugging Face dataset (hub name or local json/jsonl/csv/parquet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorabench.data.synthetic import Example
from lorabench.errors import ConfigError

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_hf_examples(cfg: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """Train and eval examples from `task.dataset`; eval falls back to a seeded holdout of train."""
    import datasets

    if not cfg.dataset:
        raise ConfigError("task.dataset: required with task.name=hf (a datasets name or a local data file)")
    path = Path(str(cfg.dataset)).expanduser()
    if path.suffix in _LOCAL_BUILDERS:
        if not path.exists():
            raise ConfigError(f"task.dataset: file {path} does not exist")
        ds = datasets.load_dataset(_LOCAL_BUILDERS[path.suffix], data_files=str(path))
    else:
        ds = datasets.load_dataset(str(cfg.dataset), cfg.dataset_config)
    if cfg.train_split not in ds:
        raise ConfigError(f"task.train_split: '{cfg.train_split}' not in dataset splits {list(ds)}")
    for field in (cfg.prompt_field, cfg.answer_field):
        if field not in ds[cfg.train_split].column_names:
            raise ConfigError(
                f"task.prompt_field/answer_field: column '{field}' not in {ds[cfg.train_split].column_names}"
            )
    train = ds[cfg.train_split]
    if cfg.eval_split in ds:
        evals = ds[cfg.eval_split]
    else:
        split = train.train_test_split(test_size=min(cfg.eval_size, len(train) // 5 or 1), seed=seed)
        train, evals = split["train"], split["test"]
    train = train.shuffle(seed=seed).select(range(min(cfg.train_size, len(train))))
    evals = evals.select(range(min(cfg.eval_size, len(evals))))

    def to_examples(d: Any) -> list[Example]:
        return [Example(str(r[cfg.prompt_field]), str(r[cfg.answer_field])) for r in d]

    return to_examples(train), to_examples(evals)
