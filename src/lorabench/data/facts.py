"""A fixed random key→value table to memorize: a pretraining task whose loss is bound by capacity.

The synthetic corpus (task=corpus) is learnt by rules a rank-8 update already holds, so rank
never limits learning there. A table of random facts has no rule: every fact costs storage,
so the value loss keeps falling with the parameters that can change, which is what separates
full-rank training from a rank-r LoRA (ReLoRA's Table 2 regime, docs/reproductions.md).

The table is fixed by `task.table_seed` alone (never by the run seed, which only reshuffles
the training order and draws the init), and it is the training set. The measurement is
memorization: the eval split is the first `eval_size` facts of that same table, scored by
the loss (and perplexity) of the value tokens. Tuning uses another `table_seed`.
"""

from __future__ import annotations

import random
from typing import Any

from lorabench.data.synthetic import LETTERS, Example
from lorabench.errors import ConfigError

KEY_LENGTH = 4  # letters per key: 26**4 = 456,976 distinct keys
VALUE_LENGTH = 4  # digits per value: log2(10**4) = 13.3 bits to store per fact
MAX_FACTS = len(LETTERS) ** KEY_LENGTH


def _key(index: int) -> str:
    """The index-th key of the KEY_LENGTH-letter keys in base-26 order."""
    chars = []
    for _ in range(KEY_LENGTH):
        index, r = divmod(index, len(LETTERS))
        chars.append(LETTERS[r])
    return "".join(reversed(chars))


def fact_table(n_facts: int, table_seed: int) -> list[Example]:
    """`n_facts` facts "<key>=" → "<value>", distinct keys, uniform digit values, fixed by `table_seed`."""
    if not 0 < n_facts <= MAX_FACTS:
        raise ConfigError(f"task.train_size: the fact table holds 1..{MAX_FACTS} facts, got {n_facts}")
    rng = random.Random(f"facts-{table_seed}")
    keys = rng.sample(range(MAX_FACTS), n_facts)  # distinct without replacement
    return [
        Example(f"{_key(k)}=", "".join(str(rng.randrange(10)) for _ in range(VALUE_LENGTH))) for k in keys
    ]


def check_fact_config(cfg: Any) -> None:
    """One line for a table that cannot be drawn or an eval split larger than the table."""
    if cfg.train_size > MAX_FACTS:
        raise ConfigError(f"task.train_size: the fact table holds at most {MAX_FACTS} facts, got {cfg.train_size}")
    if cfg.eval_size > cfg.train_size:
        raise ConfigError(
            f"task.eval_size: facts scores facts of the table itself, so at most task.train_size={cfg.train_size}, "
            f"got {cfg.eval_size}"
        )


def load_fact_examples(cfg: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): the whole table, and its first `eval_size` facts (memorization is the measurement).

    `seed` (the run's) is deliberately unused: every run of one table_seed memorizes the same facts.
    """
    del seed
    check_fact_config(cfg)
    table = fact_table(cfg.train_size, cfg.table_seed)
    return table, table[: cfg.eval_size]
