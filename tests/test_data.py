"""The synthetic suite: deterministic, disjoint, difficulty honoured, answers correct."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from lorabench.config import TaskConfig
from lorabench.data import CharTokenizer, build_task
from lorabench.data.synthetic import FAMILIES, sample_example
from lorabench.data.tokenizer import CHARS, SPECIALS
from lorabench.errors import ConfigError


def reference_ids(text: str) -> list[int]:
    """The historical ids, computed without any tokenizer: specials first, then CHARS in order."""
    return [len(SPECIALS) + CHARS.index(c) for c in text]


def task(**kw: object):
    cfg = OmegaConf.structured(TaskConfig)
    cfg.update({"train_size": 2000, "eval_size": 200, **kw})
    return build_task(cfg, CharTokenizer(), seed=kw.pop("seed", 0) if "seed" in kw else 0)


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    a, b = task(), task()
    assert torch.equal(a.train_batch(5, 16)["input_ids"], b.train_batch(5, 16)["input_ids"])
    c = build_task(OmegaConf.merge(OmegaConf.structured(TaskConfig), {"train_size": 2000, "eval_size": 200}), CharTokenizer(), seed=1)
    assert [e.prompt for e in c.eval_examples] != [e.prompt for e in a.eval_examples]


def test_train_and_eval_are_disjoint_by_prompt() -> None:
    t = task(difficulty_min=3, difficulty_max=4)  # small space: collisions would be likely
    assert not {e.prompt for e in t.train_examples} & {e.prompt for e in t.eval_examples}
    assert len({e.prompt for e in t.eval_examples}) == len(t.eval_examples)


def test_sort_difficulty_and_answers() -> None:
    t = task(difficulty_min=4, difficulty_max=14)
    lengths = [len(e.answer) for e in t.train_examples]
    assert min(lengths) == 4 and max(lengths) == 14
    for e in t.eval_examples:
        digits = e.prompt[len("sort:") : -1]
        assert e.answer == "".join(sorted(digits))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_renders_in_the_vocabulary(family: str) -> None:
    tok = CharTokenizer()
    rng = random.Random(0)
    for d in (2, 5):
        ex = sample_example(rng, family, d, d)
        assert tok.decode(tok.encode(ex.prompt + ex.answer)) == ex.prompt + ex.answer


def test_addition_and_kv_are_correct() -> None:
    rng = random.Random(1)
    for _ in range(50):
        ex = sample_example(rng, "add", 1, 5)
        a, b = ex.prompt[:-1].split("+")
        assert int(ex.answer) == int(a) + int(b)
        kv = sample_example(rng, "kv", 2, 6)
        body, key = kv.prompt[3:-1].split("?")
        assert dict((p[0], p[1]) for p in body.split(";"))[key] == kv.answer


def test_labels_mask_the_prompt_and_padding() -> None:
    t = task()
    b = t.train_batch(0, 4)
    for row, enc in zip(range(4), [t.train[int(t._perm(0)[i])] for i in range(4)]):
        labels = b["labels"][row]
        n = len(enc.ids)
        assert (labels[: enc.n_prompt] == -100).all()
        assert (labels[enc.n_prompt : n] == b["input_ids"][row, enc.n_prompt : n]).all()
        assert (labels[n:] == -100).all() and (b["attention_mask"][row, n:] == 0).all()


def test_char_tokenizer_keeps_the_historical_ids_and_round_trips() -> None:
    tok = CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, len(SPECIALS) + len(CHARS)) == (0, 1, 2, 50)
    rng = random.Random(0)
    texts = ["", " ", "  a  b ", "sort:3 1 4=1 3 4", ". , ; : ? | > = - +"]
    texts += ["".join(rng.choice(CHARS) for _ in range(rng.randint(1, 60))) for _ in range(500)]
    for s in texts:
        ids = tok.encode(s)
        assert ids == reference_ids(s)
        assert tok.decode(ids) == s
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == s  # specials are dropped


@pytest.mark.parametrize("text", ["sort:3A1", "a\nb", "caf\u00e9", "<unk>", "a<pad>b", "<eos>", "tab\there"])
def test_an_unknown_character_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        CharTokenizer().encode(text)
    msg = str(e.value)
    assert "\n" not in msg and "not in the vocabulary" in msg
    bad = next(c for c in text if c not in CHARS)
    assert repr(bad) in msg
