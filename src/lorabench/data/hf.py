"""Tables from Hugging Face `datasets` (hub name or local json/jsonl/csv/parquet file): loading,
column checks, splits; and the prompt/answer task (`task=hf`) built on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lorabench.data.synthetic import Example
from lorabench.errors import ConfigError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix -> datasets builder


def load_table(name: Optional[str], config: Optional[str] = None, key: str = "task.dataset") -> Any:
    """A `datasets.DatasetDict` from a local data file (its one split is "train") or a hub name."""
    import datasets

    if not name:
        raise ConfigError(f"{key}: required (a datasets name or a local .json/.jsonl/.csv/.parquet file)")
    path = Path(str(name)).expanduser()
    if path.suffix in LOCAL_BUILDERS:
        if not path.is_file():
            raise ConfigError(f"{key}: file {path} does not exist")
        try:
            return datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path))
        except Exception as e:  # datasets wraps parser errors in several types
            raise ConfigError(f"{key}: cannot read {path} as {path.suffix[1:]}: {str(e).splitlines()[0]}") from None
    return datasets.load_dataset(str(name), config)


def require_columns(table: Any, columns: dict[str, str], source: str) -> None:
    """One line naming the dataset, the config key and the first column the table lacks."""
    have = list(table.column_names)
    for key, column in columns.items():
        if column not in have:
            raise ConfigError(f"{key}: dataset {source} has no column '{column}' (its columns: {have})")


def train_eval_tables(cfg: Any, seed: int, columns: dict[str, str], cap_rows: bool = True) -> tuple[Any, Any]:
    """(train, eval) tables of `task.dataset`, column-checked, train shuffled, both capped at the
    task sizes (unless `cap_rows` is off: packed text caps blocks, not rows); eval falls back to
    a seeded holdout of train when `task.eval_split` does not exist."""
    ds = load_table(cfg.dataset, cfg.get("dataset_config"))
    if cfg.train_split not in ds:
        raise ConfigError(f"task.train_split: '{cfg.train_split}' not in the splits {list(ds)} of {cfg.dataset}")
    require_columns(ds[cfg.train_split], columns, str(cfg.dataset))
    train = ds[cfg.train_split]
    if cfg.eval_split in ds:
        evals = ds[cfg.eval_split]
        require_columns(evals, columns, f"{cfg.dataset} (split {cfg.eval_split})")
    else:
        if len(train) < 2:
            raise ConfigError(f"task.dataset: {cfg.dataset} has {len(train)} row(s): too few to hold some out for eval")
        split = train.train_test_split(test_size=min(cfg.eval_size, len(train) // 5 or 1), seed=seed)
        train, evals = split["train"], split["test"]
    train = train.shuffle(seed=seed)
    if cap_rows:
        train = train.select(range(min(cfg.train_size, len(train))))
        evals = evals.select(range(min(cfg.eval_size, len(evals))))
    return train, evals


def load_hf_examples(cfg: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """Train and eval prompt/answer examples from `task.dataset` (`task=hf`)."""
    columns = {"task.prompt_field": cfg.prompt_field, "task.answer_field": cfg.answer_field}
    train, evals = train_eval_tables(cfg, seed, columns)

    def to_examples(d: Any) -> list[Example]:
        return [Example(str(r[cfg.prompt_field]), str(r[cfg.answer_field])) for r in d]

    return to_examples(train), to_examples(evals)
