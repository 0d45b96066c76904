"""`lorabench-report`: one line and exit ≠ 0 for bad input; end to end on a real tiny sweep; and
the measured-memory split that figure b stacks."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lorabench import memory
from lorabench.analysis import report
from tests.helpers import TINY
from tests.test_report_fixtures import FakeApi, make_run

REPO = Path(__file__).resolve().parents[1]


def test_a_dir_without_runs_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_run(tmp_path / "sw", "0", strategy="lora", seed=0, summary={}, status="failed")
    assert report.main([str(tmp_path / "sw"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lorabench-report: error: {tmp_path / 'sw'}: no completed runs (1 failed or incomplete)"]
    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "nope: not a directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unreachable_or_empty_wandb_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(Exception, match="cannot read runs from W&B"):
        report.run(["wandb:me/proj"], tmp_path / "out", api=FakeApi([], fail=OSError("no route to host")))
    empty = FakeApi([tmp_path])  # reachable, no runs in that group
    with pytest.raises(Exception, match=r"wandb:me/proj/g: no completed runs \(0 failed or incomplete\)"):
        report.run(["wandb:me/proj/g"], tmp_path / "out", api=empty)
    proc = subprocess.run([sys.executable, "-m", "lorabench.analysis", "wandb:onlyone"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lorabench-report: error: wandb:onlyone: expected wandb:entity/project or wandb:entity/project/group"


def test_measured_breakdown_sums_to_measured_bytes() -> None:
    """Frozen Linear(4,3) and trainable Linear(3,2) in fp32 after one AdamW step, counted by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    parts = memory.measured_breakdown(model, opt)
    assert parts == {"trainable": (6 + 2) * 4, "base": (12 + 3) * 4, "grad": (6 + 2) * 4,
                     "optimizer": 2 * (6 + 2) * 4 + 2 * memory.ADAM_STEP_BYTES}
    assert sum(parts.values()) == memory.measured_bytes(model, opt)


def test_report_end_to_end_on_a_real_tiny_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """2 strategies × 2 seeds trained for real, then the command: its table and figure a hold the
    runs' own numbers, averaged here independently."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "lorabench", "-m", *TINY, "trainer.max_steps=3", "extras.print_config=false",
           "strategy=lora,qlora", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 completed runs" in printed and "0 failed or incomplete" in printed
    assert "skip figure d: ReLoRA perplexity, lr and merges for sweep: no ReLoRA runs" in printed
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    rows = {}
    for s in ("lora", "qlora"):
        acc = [r["eval/loss"] for r in summaries if r["strategy"] == s]
        mem = [r["memory/measured_bytes"] for r in summaries if r["strategy"] == s]
        assert len(acc) == 2
        rows[s] = (f"{statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f}", f"{statistics.mean(mem) / 1e6:.2f}")
    table = (out / "sweep_table.md").read_text()
    for s, (loss, mem) in rows.items():
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {s} |"))
        assert f" {loss} " in line.replace("**", "") and f" {mem}" in line.replace("**", ""), line
    for stem in ("a_accuracy_vs_memory", "b_memory_breakdown", "g_training_curves"):
        for fmt in ("png", "pdf"):
            assert (out / f"sweep_{stem}.{fmt}").stat().st_size > 5000
    index = (out / "index.md").read_text()
    assert "![a: accuracy vs measured memory](sweep_a_accuracy_vs_memory.png)" in index
    assert "4 runs of `sweep`, 2 configurations, 2 seeds each" in index
    assert (out / "sweep_table.tex").read_text().count(r"\midrule") == 1


def test_analysis_reads_outputs_only_and_never_imports_training() -> None:
    from tests.test_layering import SRC, lorabench_imports

    for path in sorted((SRC / "analysis").rglob("*.py")):
        targets = [t for t, _ in lorabench_imports(path)]
        assert not [t for t in targets if t.split(".")[0] in ("training", "strategies", "cli", "checks")], (path, targets)
