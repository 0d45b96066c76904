"""Preemption and reruns: a signal stops a job at the next step boundary with a checkpoint; a
requeued or rerun job resumes and ends with the numbers, metrics.jsonl and W&B history of an
uninterrupted one; a killed job of a submitit_local sweep is listed, and the rerun finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from lorabench.training.preempt import Preempted
from lorabench.training.trainer import Trainer
from tests.helpers import REPO, TINY, run_tiny

RESUMABLE = ["trainer.max_steps=10", "trainer.checkpoint_every=4", "trainer.eval_every=4"]
FINAL_KEYS = ("eval/loss", "eval/accuracy", "eval/token_accuracy", "eval/loss_base", "train/tokens", "train/steps")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing figures (the only things that differ between two runs)."""
    return [{k: v for k, v in r.items() if not k.endswith(("_seconds", "_per_second"))} for r in rows(run_dir)]


def signal_self_at(monkeypatch: pytest.MonkeyPatch, step: int, sig: int) -> None:
    """Deliver `sig` to this process in the middle of the step after `step` (inside train_step)."""
    real = Trainer.train_step

    def step_and_signal(self: Trainer) -> dict:
        if self.state.step == step:
            os.kill(os.getpid(), sig)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", step_and_signal)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_at_the_next_step_boundary_and_the_rerun_equals_a_straight_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: int
) -> None:
    from lorabench.wandb_offline import merged_history

    straight = run_tiny(tmp_path / "a", *RESUMABLE)
    handler_before = signal.getsignal(sig)
    signal_self_at(monkeypatch, 5, sig)  # mid step 6: it finishes, is logged, then the job stops
    with pytest.raises(Preempted, match=rf"^stopped by {signal.Signals(sig).name} at step 6; checkpoint at step 6 in "):
        run_tiny(tmp_path / "b", *RESUMABLE, "logger=wandb")
    assert signal.getsignal(sig) == handler_before  # the job's handler is gone once it stopped
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("preempted", 6)
    assert [r["step"] for r in rows(tmp_path / "b") if "train/loss" in r] == list(range(1, 7))
    monkeypatch.undo()

    resumed = run_tiny(tmp_path / "b", *RESUMABLE, "logger=wandb")
    assert resumed["status"] == "completed"
    assert {k: resumed[k] for k in FINAL_KEYS} == {k: straight[k] for k in FINAL_KEYS}
    assert comparable(tmp_path / "b") == comparable(tmp_path / "a")
    # W&B: two segments of one run; replayed as a server would (rewind to the checkpoint, then
    # append), the history is metrics.jsonl step for step: nothing missing, nothing twice
    history = merged_history(tmp_path / "b", wait_for_exit=60)
    assert by_step(history, "_step") == by_step(rows(tmp_path / "b"), "step")


def by_step(history: list[dict], step_key: str) -> dict[int, dict]:
    """Rows merged per step (W&B merges the logs of one step into one row), losses and lr only."""
    out: dict[int, dict] = {}
    for r in history:
        out.setdefault(int(r[step_key]), {}).update({k: v for k, v in r.items() if k.endswith(("loss", "lr"))})
    return out


def test_a_kill_between_checkpoints_rewinds_wandb_to_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps 5..7 were logged, then the process died; the rerun resumes at the step-4 checkpoint and
    re-logs them: the rewind drops the first copies (offline: the new segment's branch point)."""
    from lorabench.tracking import Tracker
    from lorabench.wandb_offline import find_offline_runs, merged_history, read_offline_run

    real_log = Tracker.log

    class Killed(BaseException):
        pass

    def dying_log(self: Tracker, metrics: dict, step: int) -> None:
        real_log(self, metrics, step)
        if step == 7 and "train/loss" in metrics:
            raise Killed()

    monkeypatch.setattr(Tracker, "log", dying_log)
    with pytest.raises(Killed):
        run_tiny(tmp_path, *RESUMABLE, "logger=wandb")
    monkeypatch.undo()
    run_tiny(tmp_path, *RESUMABLE, "logger=wandb")
    first, second = (read_offline_run(p, wait_for_exit=60) for p in find_offline_runs(tmp_path))
    assert [h["_step"] for h in first["history"] if "train/loss" in h] == list(range(1, 8))
    assert second["run"]["branch_point"] == {"run": first["run"]["id"], "metric": "_step", "value": 4.0}
    assert [h["_step"] for h in merged_history(tmp_path) if "train/loss" in h] == list(range(1, 11))


def test_rerun_without_a_checkpoint_starts_over_as_a_new_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed before its first checkpoint: the rerun starts from step 0, no line logged twice."""
    from lorabench.wandb_offline import find_offline_runs, read_offline_run

    real = Trainer.train_step

    def dying(self: Trainer) -> dict:
        if self.state.step == 3:
            raise SystemExit("killed")
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(SystemExit):
        run_tiny(tmp_path, *RESUMABLE, "logger=wandb")
    assert not (tmp_path / "checkpoint.pt").exists()
    monkeypatch.undo()
    assert run_tiny(tmp_path, *RESUMABLE, "logger=wandb")["status"] == "completed"
    assert [r["step"] for r in rows(tmp_path) if "train/loss" in r] == list(range(1, 11))
    runs = sorted((read_offline_run(p, wait_for_exit=60)["run"] for p in find_offline_runs(tmp_path)),
                  key=lambda r: r["start_ns"])
    assert len({r["id"] for r in runs}) == 2 and "branch_point" not in runs[1]
    assert (tmp_path / "wandb_run_id.txt").read_text() == runs[1]["id"]
