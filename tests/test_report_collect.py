"""lorabench.analysis: runs → one DataFrame (local and W&B alike), grouping, seeds, units, tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from lorabench.analysis.aggregate import aggregate, grouping_columns, missing_counts, studies
from lorabench.analysis.collect import load_local, load_wandb
from lorabench.analysis.tables import table_cells, to_latex, to_markdown
from lorabench.errors import ConfigError
from tests.test_report_fixtures import FakeApi, make_run

HIST = [{"step": 0, "eval/loss": 3.0}, {"step": 1, "train/loss": 2.5, "train/lr": 1e-3},
        {"step": 2, "train/loss": 1.5, "train/lr": 5e-4}, {"step": 2, "eval/loss": 1.25}]


def compare_sweep(root: Path) -> Path:
    """lora and full × seeds 0, 1 (known numbers), one failed job and one killed before its summary."""
    sweep = root / "cmp"
    for i, (s, seed, acc, mem) in enumerate([("lora", 0, 0.50, 10e6), ("lora", 1, 0.70, 10e6),
                                             ("full", 0, 0.90, 40e6), ("full", 1, 0.80, 40e6)]):
        make_run(sweep, f"{i}_{s}_s{seed}", strategy=s, seed=seed, history=HIST,
                 summary={"eval/accuracy": acc, "memory/measured_bytes": mem, "eval/loss": 1.25})
    make_run(sweep, "4_lora_s2", strategy="lora", seed=2, summary={"error": "boom"}, status="failed")
    (sweep / "5_lora_s3" / ".hydra").mkdir(parents=True)  # killed: a config, no summary
    (sweep / "5_lora_s3" / ".hydra" / "config.yaml").write_text("seed: 3\n")
    return sweep


def test_local_runs_become_one_row_each_with_config_and_metric_columns(tmp_path: Path) -> None:
    rs = load_local([compare_sweep(tmp_path)])
    df = rs.runs
    assert len(df) == 4 and rs.dropped == 2  # the failed and the incomplete run
    assert set(df["group"]) == {"cmp"}
    row = df[df["run"].str.endswith("0_lora_s0")].iloc[0]
    assert row["strategy.name"] == "lora" and row["strategy.rank"] == 8 and row["seed"] == 0
    assert row["optim.lr"] == 3e-3  # ${strategy.lr} resolved, as W&B receives it
    assert row["optim.betas"] == "[0.9, 0.999]"  # lists as text, so they can be grouped by
    assert row["eval/accuracy"] == 0.5 and row["memory/measured_bytes"] == 10e6
    assert row["train/loss"] == 1.5 and row["train/lr"] == 5e-4  # last history values (W&B summary semantics)
    assert "strategy/rank" not in df.columns  # the config copy in summary.json is the config column
    hist = rs.history([row["run"]], ["train/loss"])
    assert hist["step"].tolist() == [1, 2] and hist["train/loss"].tolist() == [2.5, 1.5]


def test_fake_wandb_api_gives_the_same_dataframe_as_the_local_loader(tmp_path: Path) -> None:
    sweep = compare_sweep(tmp_path)
    local = load_local([sweep])
    api = FakeApi([sweep])
    remote = load_wandb("wandb:me/proj/cmp", api)
    assert api.calls == [("me/proj", {"group": "cmp"})]
    assert remote.dropped == 1  # the failed run (the killed one never reached W&B's finished state)
    pd.testing.assert_frame_equal(local.runs.drop(columns="run"), remote.runs.drop(columns="run"))
    a = local.history(local.runs["run"].tolist(), ["train/loss", "eval/loss"]).drop(columns="run")
    b = remote.history(remote.runs["run"].tolist(), ["train/loss", "eval/loss"]).drop(columns="run")
    pd.testing.assert_frame_equal(a, b)


def test_bad_wandb_paths_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"wandb:me: expected wandb:entity/project or wandb:entity/project/group"):
        load_wandb("wandb:me", FakeApi([]))
    with pytest.raises(ConfigError, match=r"wandb:me/proj: cannot read runs from W&B \(ConnectionError: unreachable\)"):
        load_wandb("wandb:me/proj", FakeApi([], fail=ConnectionError("unreachable")))


def test_grouping_splits_every_varying_config_key_but_the_seed(tmp_path: Path) -> None:
    """A 40-step and a 200-step lora run are two rows; the seed (and pretrain_seed = seed) is not a
    reason to split; seeds are counted as distinct seeds, not runs."""
    sweep = tmp_path / "mix"
    for i, (steps, seed, acc) in enumerate([(40, 0, 0.1), (40, 1, 0.3), (200, 0, 0.6), (200, 0, 0.8), (200, 1, 0.7)]):
        make_run(sweep, f"{i}", strategy="lora", seed=seed, config={"trainer.max_steps": steps, "trainer.threads": i},
                 summary={"eval/accuracy": acc}, overrides=[f"trainer.max_steps={steps}", f"seed={seed}"])
    df = load_local([sweep]).runs
    assert grouping_columns(df) == ["trainer.max_steps"]  # not seed, model.pretrain_seed, run_dir, threads
    agg = aggregate(df, ["eval/accuracy"]).set_index("label")
    assert agg.loc["max_steps=40", "seeds"] == 2 and agg.loc["max_steps=40", "runs"] == 2
    assert agg.loc["max_steps=200", "seeds"] == 2 and agg.loc["max_steps=200", "runs"] == 3
    assert math.isclose(agg.loc["max_steps=40", "eval/accuracy:mean"], 0.2)
    assert math.isclose(agg.loc["max_steps=200", "eval/accuracy:mean"], 0.7)
    assert math.isclose(agg.loc["max_steps=200", "eval/accuracy:std"], 0.1)


def test_mixed_tasks_are_separate_studies_and_missing_metrics_are_counted(tmp_path: Path) -> None:
    sweep = tmp_path / "tasks"
    make_run(sweep, "0", strategy="lora", seed=0, config={"task.name": "sort"}, summary={"eval/accuracy": 0.4, "eval/loss": 1.0})
    make_run(sweep, "1", strategy="lora", seed=1, config={"task.name": "sort"}, summary={"eval/loss": 3.0})
    make_run(sweep, "2", strategy="lora", seed=0, config={"task.name": "add"}, summary={"eval/accuracy": 0.9, "eval/loss": 0.5})
    parts = studies(load_local([sweep]).runs)
    assert sorted(parts) == ["tasks-add", "tasks-sort"]
    sort = parts["tasks-sort"]
    assert missing_counts(sort, ["eval/accuracy", "eval/loss"]) == {"eval/accuracy": 1}
    t = table_cells(aggregate(sort, ["eval/accuracy", "eval/loss"]), ["eval/accuracy", "eval/loss"])
    assert t.header == ["configuration", "seeds", "exact match (%)", "eval loss"]
    assert t.rows == [["lora", "2", "40.0 (n=1)", "2.000 ± 1.414"]]  # 0.4 alone (no ± from one value); the loss over 2 seeds
    add = table_cells(aggregate(parts["tasks-add"], ["eval/accuracy"]), ["eval/accuracy"])
    assert add.rows == [["lora", "1", "90.0"]]  # a single seed: no "± 0"


def test_tables_bold_the_best_cell_per_column_in_markdown_and_latex(tmp_path: Path) -> None:
    df = load_local([compare_sweep(tmp_path)]).runs
    metrics = ["eval/accuracy", "memory/measured_bytes"]
    t = table_cells(aggregate(df, metrics), metrics)
    # lora 60 ± 14.1 %, full 85 ± 7.1 %; memory 10 and 40 MB (10^6 bytes), no spread
    assert t.rows == [["lora", "2", "60.0 ± 14.1", "10.00 ± 0.00"], ["full", "2", "85.0 ± 7.1", "40.00 ± 0.00"]]
    assert t.bold == [[False, False, False, True], [False, False, True, False]]
    md = to_markdown(t)
    assert "| full | 2 | **85.0 ± 7.1** | 40.00 ± 0.00 |" in md and "| lora | 2 | 60.0 ± 14.1 | **10.00 ± 0.00** |" in md
    tex = to_latex(t, "cap_1")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"full & 2 & \textbf{85.0 $\pm$ 7.1} & 40.00 $\pm$ 0.00 \\" in tex
    assert r"configuration & seeds & exact match (\%) & measured memory (MB) \\" in tex
    assert r"\caption{cap\_1}" in tex


def test_summary_json_overrides_field_is_read(tmp_path: Path) -> None:
    run = make_run(tmp_path / "s", "0", strategy="lora", seed=0, summary={"eval/accuracy": 0.5},
                   overrides=["strategy=lora", "strategy.rank=4", "seed=0"])
    df = load_local([run.parent]).runs
    assert json.loads(df.loc[0, "overrides"]) == ["strategy=lora", "strategy.rank=4", "seed=0"]
