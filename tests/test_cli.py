"""The console script: bad input is one line and a non-zero exit; no completed summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY

REPO = Path(__file__).resolve().parents[1]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "lorabench", *TINY, f"hydra.run.dir={tmp_path}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)  # a bounded job: its exit is the event


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("lorabench: error:")]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["strategy=lorra"], "strategy: unknown strategy 'lorra', expected one of"),
        (["task=sorting"], "task: unknown task 'sorting', expected one of"),
        (["debug=quick"], "debug: unknown debug 'quick', expected one of ['default', 'overfit']"),
        (["strategy.rank=0"], "strategy.rank: must be a positive integer, got 0"),
        (["optim.lr=-1e-3"], "optim.lr: expected a number > 0, got -0.001"),
        (["model=hf", "model.name_or_path=/nonexistent/model"], "model.name_or_path: model dir /nonexistent/model does not exist"),
        (["strategy.target_modules=[nope]"], "strategy.target_modules: ['nope'] matched no linear layer"),
        (["task.name=nosuchfamily"], "task.name: unknown task 'nosuchfamily'"),
        (["trainer.max_stpes=3"], "Could not override 'trainer.max_stpes'. Key 'max_stpes' not in 'TrainerConfig'"),
        (["trainer.max_steps=abc"], "trainer.max_steps=abc Value 'abc' of type 'str' could not be converted to Integer"),
        (["-m", "strategy=full,lora", "optim.lrr=1e-3,2e-3"], "optim.lrr: no such config key"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_exit(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    summary = tmp_path / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"


def test_python_dash_m_runs_a_tiny_job(tmp_path: Path) -> None:
    proc = cli(tmp_path, "strategy=lora", "trainer.max_steps=2", "optim.lr=0.002")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["train/steps"] == 2
    # every launch override is recorded (optim.lr is not among the summary's own keys)
    assert summary["overrides"][-3:] == ["strategy=lora", "trainer.max_steps=2", "optim.lr=0.002"]
    assert summary["train/threads"] >= 1


def test_multirun_gives_one_run_dir_summary_and_wandb_run_per_job(tmp_path: Path) -> None:
    from lorabench.wandb_offline import find_offline_runs, read_offline_run

    env = {**os.environ, "WANDB_MODE": "offline"}
    tiny = [a for a in TINY if not a.startswith("logger")]
    cmd = [sys.executable, "-m", "lorabench", "-m", *tiny, "trainer.max_steps=2",
           "strategy=full,lora", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if (p / "summary.json").exists())
    assert [p.name for p in jobs] == ["0_full_s0", "1_full_s1", "2_lora_s0", "3_lora_s1"]
    ids, groups = set(), set()
    for job in jobs:
        s = json.loads((job / "summary.json").read_text())
        assert s["status"] == "completed"
        assert (s["strategy"], s["seed"]) == (job.name.split("_")[1], int(job.name[-1]))
        runs = find_offline_runs(job)
        assert len(runs) == 1
        rec = read_offline_run(runs[0], wait_for_exit=60)
        ids.add(rec["run"]["id"])
        groups.add(rec["run"]["group"])
    assert len(ids) == 4 and groups == {tmp_path.name}


@pytest.mark.slow
@pytest.mark.parametrize("sigint", ["ignored", "default"])
def test_ctrl_c_is_one_line_exit_130_and_resumable(tmp_path: Path, spawn, sigint: str) -> None:
    """`kill -INT` mid-run, to a job that inherited SIGINT ignored (started in the background by a
    non-interactive shell) or with the default disposition: it stops at the next step boundary,
    writes a checkpoint at that step, prints one line naming the step, the checkpoint and the
    resume command, and exits 130. Waits on events (a checkpoint file, logged steps), not seconds."""
    import signal

    import torch

    from tests.helpers import logged_steps, wait_for, wait_for_exit

    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=100000", "trainer.checkpoint_every=2", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as fo, err.open("w") as fe:
        proc = spawn([sys.executable, "-m", "lorabench", *args], sigint=sigint, stdout=fo, stderr=fe, env=env, cwd=REPO)
    wait_for(lambda: (run_dir / "checkpoint.pt").exists(), proc, "its first checkpoint")
    sent_at = max(logged_steps(run_dir))
    proc.send_signal(signal.SIGINT)
    rc = wait_for_exit(proc, run_dir, sent_at)
    stderr = err.read_text()
    assert rc == 130, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-2000:]
    step = max(logged_steps(run_dir))
    assert sent_at <= step <= sent_at + 3  # the next step boundary (the child runs on while the signal is sent)
    assert lines[0].startswith(f"lorabench: interrupted at step {step}; the last checkpoint is step {step} in {run_dir}; "
                               "resume with: lorabench "), lines[0]
    assert lines[0].endswith(f"hydra.run.dir={run_dir}")
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["step"] == step
    assert logged_steps(run_dir) == list(range(1, step + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("interrupted", step)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under `run_dir`, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_rerun_into_a_completed_run_dir_with_another_config_is_refused(tmp_path: Path) -> None:
    """`strategy=full` into a finished lora run dir: one line naming strategy.name, exit 2, every
    file as it was (Hydra's .hydra/config.yaml included, which lorabench-eval and lorabench-report
    read). The identical rerun is skipped, exit 0."""
    assert cli(tmp_path, "strategy=lora", "trainer.max_steps=2").returncode == 0
    before = snapshot(tmp_path)
    proc = cli(tmp_path, "strategy=full", "trainer.max_steps=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"lorabench: error: strategy.name: {tmp_path} holds a completed run with strategy.name=lora, "
                               "this run has strategy.name=full; "), lines[0]
    assert snapshot(tmp_path) == before
    again = cli(tmp_path, "strategy=lora", "trainer.max_steps=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"lorabench: {tmp_path} holds a completed run; not training it again" in again.stderr
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "cli.log"} == {k: v for k, v in before.items() if k != "cli.log"}


@pytest.mark.slow
def test_a_refused_job_of_a_sweep_is_a_failed_row_and_the_others_run(tmp_path: Path) -> None:
    """Rerunning a sweep dir with another optim.lr: job 0's dir holds a completed run of the old
    value and is refused (one line, its dir as it was); job 1 is new and runs; the sweep summary
    has one row per job and the sweep exits 1."""
    import pandas as pd

    def sweep(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "lorabench", "-m", *TINY, "trainer.max_steps=2", "extras.print_config=false",
               f"hydra.sweep.dir={tmp_path}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HYDRA_FULL_ERROR": "0"})

    first = sweep("seed=0", "optim.lr=0.002")
    assert first.returncode == 0, first.stderr[-3000:]
    job0 = tmp_path / "0_lora_s0"
    before = snapshot(job0)
    second = sweep("seed=0,1", "optim.lr=0.00123")
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"lorabench: error: job 0 refused (run dir {job0}): optim.lr: {job0} holds a completed run with " \
           "optim.lr=0.002, this run has optim.lr=0.00123; " in second.stderr
    assert "Traceback" not in second.stderr
    assert snapshot(job0) == before
    csv = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert sorted(zip(csv["job"], csv["status"])) == [(0, "failed"), (1, "completed")]
    assert csv.set_index("job")["error"][0].startswith("optim.lr: ")
    assert "lorabench: 1 of 2 jobs failed" in second.stderr
