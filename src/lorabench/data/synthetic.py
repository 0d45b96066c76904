"""Procedurally generated task families: prompt → answer text in the synthetic character language.

Each family maps (rng, difficulty) to one example; difficulty means list length, digits or
pairs depending on the family. The tiny backbone is pretrained on a mixture (add, reverse,
copy, kv by default) at small difficulties; `sort` and `caesar` are formats it never saw,
so fine-tuning on them has something real to learn.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def _add(rng: random.Random, d: int) -> Example:
    """Addition of two numbers of up to d digits."""
    a, b = rng.randrange(10**d), rng.randrange(10**d)
    return Example(f"{a}+{b}=", str(a + b))


def _sub(rng: random.Random, d: int) -> Example:
    """Subtraction a-b with a ≥ b, up to d digits."""
    a, b = sorted((rng.randrange(10**d), rng.randrange(10**d)), reverse=True)
    return Example(f"{a}-{b}=", str(a - b))


def _reverse(rng: random.Random, d: int) -> Example:
    """Reverse d letters."""
    s = "".join(rng.choice(LETTERS) for _ in range(d))
    return Example(f"rev:{s}=", s[::-1])


def _copy(rng: random.Random, d: int) -> Example:
    """Copy d letters."""
    s = "".join(rng.choice(LETTERS) for _ in range(d))
    return Example(f"cp:{s}=", s)


def _kv(rng: random.Random, d: int) -> Example:
    """Recall the digit stored under one of d distinct letter keys."""
    keys = rng.sample(LETTERS, d)
    vals = [str(rng.randrange(10)) for _ in keys]
    q = rng.randrange(d)
    body = ";".join(f"{k}{v}" for k, v in zip(keys, vals))
    return Example(f"kv:{body}?{keys[q]}=", vals[q])


def _sort(rng: random.Random, d: int) -> Example:
    """Sort d digits ascending (unseen in pretraining)."""
    s = [str(rng.randrange(10)) for _ in range(d)]
    return Example(f"sort:{''.join(s)}=", "".join(sorted(s)))


def _caesar(rng: random.Random, d: int) -> Example:
    """Shift d letters by 3 (unseen in pretraining; saturates quickly, kept for smoke tests)."""
    s = "".join(rng.choice(LETTERS) for _ in range(d))
    return Example(f"rot:{s}=", "".join(LETTERS[(LETTERS.index(c) + 3) % 26] for c in s))


FAMILIES: dict[str, Callable[[random.Random, int], Example]] = {
    "add": _add,
    "sub": _sub,
    "reverse": _reverse,
    "copy": _copy,
    "kv": _kv,
    "sort": _sort,
    "caesar": _caesar,
}

# Difficulty ranges used when a family is part of the pretraining corpus.
CORPUS_DIFFICULTY: dict[str, tuple[int, int]] = {
    "add": (1, 3),
    "sub": (1, 3),
    "reverse": (3, 10),
    "copy": (3, 10),
    "kv": (2, 5),
    "sort": (3, 8),
    "caesar": (3, 10),
}


def sample_example(rng: random.Random, family: str, dmin: int, dmax: int) -> Example:
    """One example of `family` at a difficulty drawn uniformly from [dmin, dmax]."""
    return FAMILIES[family](rng, rng.randint(dmin, dmax))


def sample_corpus_example(rng: random.Random, families: list[str]) -> Example:
    """One pretraining-mixture example: a family at random, at its corpus difficulty."""
    fam = rng.choice(families)
    lo, hi = CORPUS_DIFFICULTY[fam]
    return sample_example(rng, fam, lo, hi)


def make_splits(
    sample: Callable[[random.Random], Example], n_train: int, n_eval: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Eval set first, then a train set that never repeats an eval prompt (disjoint by prompt)."""
    eval_rng = random.Random(f"eval-{seed}")
    evals: list[Example] = []
    seen: set[str] = set()
    tries = 0
    while len(evals) < n_eval and tries < 50 * n_eval + 100:
        ex = sample(eval_rng)
        tries += 1
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            evals.append(ex)
    train_rng = random.Random(f"train-{seed}")
    train: list[Example] = []
    tries = 0
    while len(train) < n_train and tries < 50 * n_train + 100:
        ex = sample(train_rng)
        tries += 1
        if ex.prompt not in seen:
            train.append(ex)
    return train, evals
