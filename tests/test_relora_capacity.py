"""The capacity-bound fact table (task=facts) and ReLoRA's Table 2 preset on it (experiment=relora_capacity).

The design's invariants, with exact counts: the table is fixed by task.table_seed and never by the
run seed, the eval split is the table's own first facts, every key is distinct, each fact is
tokenized to bos + 5 prompt tokens + 4 value digits + eos with loss on the last 5, one epoch
visits every fact once; and every job of the preset composes and validates.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
import string
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lorabench.checks import validate
from lorabench.data import CharTokenizer, build_task
from lorabench.data.facts import KEY_LENGTH, MAX_FACTS, VALUE_LENGTH, fact_table
from lorabench.errors import ConfigError
from tests.helpers import REPO, TINY, compose_cfg, run_tiny, tiny_cfg
from tests.test_experiments import job_cfg, sweep_jobs


def facts_cfg(**keys: object) -> object:
    base = dict(name="facts", table_seed=0, train_size=2000, eval_size=2000, loss_on="answer", max_length=128)
    return OmegaConf.create({**base, **keys})


def test_table_is_fixed_by_table_seed_not_by_run_seed() -> None:
    tok = CharTokenizer()
    a, b = build_task(facts_cfg(), tok, seed=0), build_task(facts_cfg(), tok, seed=1)
    assert a.train_examples == b.train_examples and len(a.train_examples) == 2000
    assert a.eval_examples == a.train_examples  # eval_size = train_size: the whole table is scored
    assert MAX_FACTS == 26**4 == 456_976
    first = a.train_examples[0]
    assert (first.prompt, first.answer) == ("hnzq=", "0437")  # golden (the 2000-fact table of table_seed=0)
    all_keys = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=KEY_LENGTH)]
    drawn = random.Random("facts-0").sample(range(MAX_FACTS), 2000)  # the key indices, independently
    assert [e.prompt for e in a.train_examples] == [all_keys[i] + "=" for i in drawn]
    keys = {e.prompt for e in a.train_examples}
    assert len(keys) == 2000  # distinct keys, so no fact contradicts another
    assert all(len(e.prompt) == KEY_LENGTH + 1 and e.prompt.endswith("=") for e in a.train_examples)
    assert all(len(e.answer) == VALUE_LENGTH and e.answer.isdigit() for e in a.train_examples)
    other = {e.prompt for e in fact_table(2000, table_seed=1)}
    # two independent draws of 2000 of 456,976 keys share about 2000²/456,976 ≈ 8.8 keys
    assert len(keys & other) < 40


def test_eval_is_a_prefix_of_the_table_and_counts_are_exact() -> None:
    data = build_task(facts_cfg(train_size=300, eval_size=120), CharTokenizer(), seed=3)
    assert len(data.train) == 300 and len(data.eval) == 120
    assert data.eval_examples == data.train_examples[:120]
    assert all(len(e.ids) == 1 + 5 + 4 + 1 and e.n_prompt == 6 for e in data.train)
    batch = data.collate(data.eval[:16])
    assert int((batch["labels"] != -100).sum()) == 16 * (VALUE_LENGTH + 1)  # value digits + eos only


def test_one_epoch_visits_every_fact_once_in_a_seeded_order() -> None:
    tok = CharTokenizer()
    orders = []
    for seed in (0, 1):
        data = build_task(facts_cfg(train_size=64, eval_size=64), tok, seed=seed)
        rows = [tuple(r.tolist()) for i in range(4) for r in data.train_batch(i, 16)["input_ids"]]
        assert sorted(rows) == sorted(tuple(e.ids) for e in data.train)  # 4 × 16 = the 64 facts, once each
        orders.append(rows)
    assert orders[0] != orders[1]  # the run seed reshuffles the same table


@pytest.mark.parametrize(
    "overrides, key",
    [(("task.train_size=100", "task.eval_size=101"), "task.eval_size"),
     (("task.train_size=456977", "task.eval_size=10"), "task.train_size")],
)
def test_bad_sizes_are_one_line_naming_the_key(overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("task=facts", *overrides))
    assert str(e.value).startswith(f"{key}:") and "\n" not in str(e.value)


def test_every_job_of_relora_capacity_composes_and_validates() -> None:
    jobs = sweep_jobs("relora_capacity")
    assert len(jobs) == 15  # 5 cells × 3 seeds
    cells = {}
    for job in jobs:
        cfg = job_cfg("relora_capacity", job)
        validate(cfg)
        assert cfg.task.name == "facts" and cfg.task.table_seed == 0  # the reported table (1 chose the settings)
        assert cfg.task.eval_size == cfg.task.train_size and cfg.model.pretrain_steps == 0
        assert cfg.optim.restart_every == cfg.get("strategy", {}).get("reset_every", cfg.trainer.max_steps)
        cell = next(o.split("=", 1)[1] for o in job if o.startswith("+experiment"))
        cells[cell] = cfg
    s = {k: c.strategy for k, c in cells.items() if k != "full"}
    assert cells["full"].strategy.name == "full"
    assert {c.rank for c in s.values()} == {4} and {c.name for c in s.values()} == {"relora"}
    steps = cells["full"].trainer.max_steps
    assert s["lora"].reset_every == steps and s["lora"].warm_start_steps == 0  # never merged mid-run
    assert s["lora_ws"].warm_start_steps == s["relora_ws"].warm_start_steps == steps // 2
    assert (steps - s["relora_ws"].warm_start_steps) // s["relora_ws"].reset_every == 5  # 5 cycles after warm start
    assert steps // s["relora"].reset_every == 5
    for c in s.values():  # warm start at the full cell's lr
        if c.warm_start_steps:
            assert math.isclose(c.lr * c.warm_start_lr_ratio, cells["full"].strategy.lr, rel_tol=1e-3)


def test_a_tiny_facts_run_scores_value_perplexity(tmp_path: Path) -> None:
    summary = run_tiny(tmp_path / "run", *TINY, "task=facts", "task.train_size=64", "task.eval_size=64",
                       "task.generate=false", "optimized_metric=eval/perplexity")
    assert summary["status"] == "completed"
    assert math.isclose(summary["eval/perplexity"], math.exp(summary["eval/loss"]), rel_tol=1e-9)
    assert "eval/accuracy" not in summary


def load_script(name: str) -> object:
    """An analysis/ script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "analysis" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relora_rank_recomputes_the_logged_rank_densely(tmp_path: Path) -> None:
    from lorabench.training import job

    run_dir = tmp_path / "run"
    cfg = tiny_cfg(run_dir, *TINY, "task=facts", "task.train_size=64", "task.eval_size=16", "task.generate=false",
                   "strategy=relora", "strategy.rank=2", "strategy.reset_every=2", "strategy.restart_warmup_steps=1",
                   "optim.warmup_steps=1", "strategy.keep_factors=true")
    summary = job.run(cfg)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    out = load_script("relora_rank").run_ranks(run_dir)
    assert out["merges"] == 3 and out["layers"] == 14  # 6 steps / T=2; q,k,v,o,gate,up,down × 2 layers
    assert out["numerical"] == summary["relora/update_rank_mean"] == 6.0  # 3 cycles × r=2, in 64-wide layers
    assert 1 <= out["energy99"] <= out["numerical"] and out["above1pct"] <= out["numerical"]


def test_capacity_probe_table_is_mean_and_sample_std_per_configuration() -> None:
    import pandas as pd

    probe = load_script("capacity_probe")
    runs = pd.DataFrame({
        "task.train_size": [1000] * 3, "task.table_seed": [0] * 3, "strategy.name": ["full"] * 3,
        "strategy.rank": [None] * 3, "strategy.reset_every": [None] * 3, "strategy.warm_start_steps": [None] * 3,
        "trainer.max_steps": [1000] * 3, "strategy.lr": [1e-3] * 3, "seed": [0, 1, 2],
        "eval/loss": [0.1, 0.2, 0.6], "eval/perplexity": [1.0, 2.0, 3.0], "eval/token_accuracy": [0.5] * 3,
        "params/trainable": [341120] * 3,
    })
    t = probe.table(runs)
    assert len(t) == 1 and t.loc[0, "seeds"] == 3
    assert math.isclose(t.loc[0, "eval/loss"], 0.3) and math.isclose(t.loc[0, "eval/loss:std"], math.sqrt(0.07))
    assert "| 1000 | 0 | full |" in probe.markdown(t) and "2.000 ± 1.000" in probe.markdown(t)
    assert math.isclose(probe.CHANCE_LOSS, -sum([math.log(0.1)] * 4 + [math.log(1.0)]) / 5)  # 4 uniform digits + a sure eos
