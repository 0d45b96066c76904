"""analysis/collect.py turns run dirs into a mean ± std table and a figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "analysis"))

import collect  # noqa: E402


def write(run: Path, **row: object) -> None:
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "completed", **row}))


def test_collect_groups_by_strategy_and_averages_seeds(tmp_path: Path, capsys) -> None:
    write(tmp_path / "a", strategy="lora", seed=0, **{"eval/accuracy": 0.5, "eval/loss": 1.0})
    write(tmp_path / "b", strategy="lora", seed=1, **{"eval/accuracy": 0.7, "eval/loss": 3.0})
    write(tmp_path / "c", strategy="full", seed=0, **{"eval/accuracy": 0.9, "eval/loss": 0.5})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "summary.json").write_text(json.dumps({"status": "failed", "strategy": "lora", "seed": 2}))
    png = tmp_path / "acc.png"
    assert collect.main([str(tmp_path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| lora | 60.0 ± 14.1 | 2 ± 1.4 | 2 |" in out
    assert "| full | 90.0 ± 0.0 | 0.5 ± 0 | 1 |" in out
    assert "1 run(s) did not complete" in out
    assert png.stat().st_size > 1000


def test_an_lr_sweep_stays_one_row_per_lr(tmp_path: Path, capsys) -> None:
    """Runs differing in an override (here optim.lr) are separate rows; seeds are averaged."""
    for i, (lr, seed, acc) in enumerate([("1e-3", 0, 0.2), ("1e-3", 1, 0.4), ("3e-3", 0, 0.6), ("3e-3", 1, 0.8)]):
        write(tmp_path / str(i), strategy="lora", seed=seed, overrides=[f"optim.lr={lr}", f"seed={seed}"],
              **{"eval/accuracy": acc, "eval/loss": 1.0})
    assert collect.main([str(tmp_path), "--metrics", "eval/accuracy"]) == 0
    out = capsys.readouterr().out
    assert "| lora | 1e-3 | 30.0 ± 14.1 | 2 |" in out
    assert "| lora | 3e-3 | 70.0 ± 14.1 | 2 |" in out
