"""Multiruns: bad jobs are validated up front and recorded without stopping the others; the
sweep's exit code, sweep_summary.csv and its printed table; threads under the joblib launcher."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tests.helpers import TINY

REPO = Path(__file__).resolve().parents[1]


def sweep(sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "lorabench", "-m", *TINY, "trainer.max_steps=2", "extras.print_config=false",
           f"hydra.sweep.dir={sweep_dir}", *args]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                          timeout=300)


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))}


def test_bad_job_is_validated_up_front_recorded_and_the_others_run(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "strategy=lora", "strategy.rank=8,0,4")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    upfront = "lorabench: error: job 1 (strategy.rank=0): strategy.rank: must be a positive integer, got 0"
    assert upfront in out
    assert out.index(upfront) < out.index("run dir")  # printed before the first job built anything
    s = summaries(tmp_path)
    assert sorted(s) == ["0_lora_s0", "1_lora_s0", "2_lora_s0"]
    assert s["1_lora_s0"]["status"] == "failed"
    assert s["1_lora_s0"]["error"] == "strategy.rank: must be a positive integer, got 0"
    assert not (tmp_path / "1_lora_s0" / "metrics.jsonl").exists()  # never ran
    for name, rank in (("0_lora_s0", 8), ("2_lora_s0", 4)):
        assert s[name]["status"] == "completed" and s[name]["train/steps"] == 2
        assert s[name]["strategy/rank"] == rank
        assert f"strategy.rank={rank}" in s[name]["overrides"]
    csv = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert list(csv["job"]) == [0, 1, 2]
    assert list(csv["status"]) == ["completed", "failed", "completed"]
    assert csv.loc[0, "eval/loss"] == s["0_lora_s0"]["eval/loss"]
    assert "failed: job 1 (strategy.rank=0): strategy.rank: must be a positive integer, got 0" in out
    assert "lorabench: 1 of 3 jobs failed" in out


def test_lr_sweep_table_has_one_row_per_lr_with_mean_std_over_seeds(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "strategy=lora", "optim.lr=1e-3,3e-3", "seed=0,1", "hydra/launcher=parallel")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    s = summaries(tmp_path)
    assert len(s) == 4 and all(v["status"] == "completed" for v in s.values())
    auto = max(1, (os.cpu_count() or 1) // 2)  # parallel.yaml: n_jobs=2
    assert {v["train/threads"] for v in s.values()} == {auto}
    lines = out[out.index("sweep summary "):].splitlines()
    header = lines[1].split()
    assert header[:2] == ["optim.lr", "eval/accuracy"] and header[-1] == "seeds"
    rows = [ln for ln in lines[2:4]]
    assert all(ln.count("± ") == 4 and ln.rstrip().endswith(" 2") for ln in rows), lines[:5]
    for row, lr in zip(rows, ("0.001", "0.003")):
        losses = [v["eval/loss"] for v in s.values() if f"optim.lr={lr}" in v["overrides"] or
                  f"optim.lr={float(lr):g}" in v["overrides"]]
        assert len(losses) == 2
        assert f"{statistics.mean(losses):.4g} ± {statistics.stdev(losses):.4g}" in row
    csv = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert len(csv) == 4 and set(csv["status"]) == {"completed"}


def test_user_threads_kept_and_single_seed_shows_no_std(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "strategy=lora", "strategy.rank=2,4", "trainer.threads=3", "hydra/launcher=parallel")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    s = summaries(tmp_path)
    assert len(s) == 2 and {v["train/threads"] for v in s.values()} == {3}
    table = out[out.index("sweep summary "):out.index("wrote ")]
    assert "±" not in table and "strategy.rank" in table


def test_every_job_failing_exits_nonzero_and_summary_says_so(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "strategy=lora", "strategy.rank=0,-1")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "lorabench: 2 of 2 jobs failed" in out
    csv = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert list(csv["status"]) == ["failed", "failed"]


def test_jobs_that_do_not_compose_are_one_line_each_and_left_out_while_the_others_run(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "trainer.batch_size=8,abc,xyz")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("lorabench: error: job")]
    assert [ln.split(" (")[0] for ln in lines] == ["lorabench: error: job 1", "lorabench: error: job 2"]
    assert "Value 'abc' of type 'str' could not be converted to Integer" in lines[0]
    assert "lorabench: 2 job(s) that do not compose are left out and recorded as failed; the others run " \
           "(trainer.batch_size=8)" in out
    s = summaries(tmp_path)
    assert list(s) == ["0_lora_s0"] and s["0_lora_s0"]["status"] == "completed"
    csv = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert list(csv["status"]) == ["completed", "failed", "failed"]
    assert "lorabench: 2 of 3 jobs failed" in out


def test_unknown_group_choice_in_a_sweep_is_left_out_and_the_others_run(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "strategy=lora,nosuch")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert [ln for ln in out.splitlines() if ln.startswith("lorabench: error:")] == [
        "lorabench: error: job 1 (strategy=nosuch): strategy: unknown strategy 'nosuch', expected one of "
        f"{sorted(p.stem for p in (REPO / 'conf' / 'strategy').glob('*.yaml'))}"
    ]
    assert summaries(tmp_path)["0_lora_s0"]["status"] == "completed"


def test_a_sweep_where_no_job_composes_runs_nothing(tmp_path: Path) -> None:
    proc = sweep(tmp_path, "trainer.batch_size=abc,xyz")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "lorabench: no job of the sweep composes; nothing ran" in proc.stdout
    assert "Traceback" not in proc.stdout and not list(tmp_path.glob("*/summary.json"))


def test_exception_inside_training_fails_its_job_and_its_wandb_run_only(tmp_path: Path) -> None:
    """A job that fails after its W&B run started: summary failed, W&B exit code 1; the other job runs."""
    from lorabench.wandb_offline import find_offline_runs, read_offline_run

    tiny = [a for a in TINY if not a.startswith("logger")]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "lorabench", "-m", *tiny, "trainer.max_steps=2", "extras.print_config=false",
           "strategy=lora", "strategy.target_modules=[nope],[q_proj]", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    s0 = json.loads((tmp_path / "0_lora_s0" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "1_lora_s0" / "summary.json").read_text())
    assert s0["status"] == "failed" and "matched no linear layer" in s0["error"]
    assert s1["status"] == "completed"
    codes = [read_offline_run(find_offline_runs(tmp_path / d)[0], wait_for_exit=60)["exit_code"]
             for d in ("0_lora_s0", "1_lora_s0")]
    assert codes == [1, 0]


def test_a_job_dir_without_summary_is_listed_missing_killed(tmp_path: Path) -> None:
    from lorabench.training.sweep import report

    for num, seed, summary in ((0, 0, {"status": "completed", "eval/loss": 1.5}), (1, 1, None)):
        hydra = tmp_path / f"{num}_lora_s{seed}" / ".hydra"
        hydra.mkdir(parents=True)
        (hydra / "overrides.yaml").write_text(f"- seed={seed}\n")
        (hydra / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        if summary:
            (hydra.parent / "summary.json").write_text(json.dumps(summary))
    not_run = [{"job": None, "overrides": "seed=2 strategy=nosuch", "status": "failed", "error": "no such strategy"}]
    assert report(tmp_path, not_run) == (3, 2)
    csv = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert list(csv["status"]) == ["completed", "missing/killed", "failed"]
    assert csv.loc[1, "error"].startswith(f"no summary.json in {tmp_path / '1_lora_s1'}: the job was killed")


def test_without_values_drops_only_values_that_fail_on_their_own() -> None:
    from lorabench.training.sweep import expand_jobs, without_values

    overrides = ["strategy=lora,nosuch", "seed=0,1", "trainer.max_steps=2"]
    jobs = expand_jobs(overrides)
    assert len(jobs) == 4
    bad = {n for n, job in enumerate(jobs) if "strategy=nosuch" in job}
    assert without_values(overrides, jobs, bad) == ["strategy=lora", "seed=0,1", "trainer.max_steps=2"]
    one = {next(n for n, job in enumerate(jobs) if job[:2] == ["strategy=nosuch", "seed=1"])}
    assert without_values(overrides, jobs, one) is None  # a combination: dropping a value drops good jobs
    assert without_values(overrides, jobs, set(range(4))) is None  # nothing left


def test_a_grid_sweep_without_the_objective_keeps_its_completed_runs(tmp_path: Path) -> None:
    """`optimized_metric` (eval/accuracy) absent from a perplexity-only task: a warning, not a failure,
    under the basic sweeper; the completed summaries keep their metrics and the sweep exits 0."""
    tiny = [a for a in TINY if not a.startswith("logger")]
    cmd = [sys.executable, "-m", "lorabench", "-m", *tiny, "logger=none", "trainer.max_steps=2",
           "extras.print_config=false", "task.generate=false", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("optimized_metric: 'eval/accuracy' is not in the run's summary") == 2
    for d in ("0_lora_s0", "1_lora_s1"):
        s = json.loads((tmp_path / d / "summary.json").read_text())
        assert s["status"] == "completed" and "eval/loss" in s and "eval/accuracy" not in s
