"""A job rerun into its run dir resumes from the checkpoint and ends with the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorabench.tracking import Tracker
from tests.helpers import run_tiny

RESUMABLE = [
    "trainer.max_steps=12",
    "trainer.checkpoint_every=4",
    "trainer.eval_every=4",
    "strategy.dropout=0.1",  # dropout draws from the RNG: the checkpoint must restore it
]


class Interrupted(Exception):
    pass


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("interrupt_at", [6, 9])
def test_resume_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt_at: int) -> None:
    straight = run_tiny(tmp_path / "a", *RESUMABLE)

    real_log = Tracker.log

    def crashing_log(self: Tracker, metrics: dict, step: int) -> None:
        if step == interrupt_at and "train/loss" in metrics:
            raise Interrupted(f"killed at step {step}")
        real_log(self, metrics, step)

    monkeypatch.setattr(Tracker, "log", crashing_log)
    with pytest.raises(Interrupted):
        run_tiny(tmp_path / "b", *RESUMABLE)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "failed"
    monkeypatch.setattr(Tracker, "log", real_log)

    resumed = run_tiny(tmp_path / "b", *RESUMABLE)
    assert resumed["status"] == "completed"
    for key in ("eval/loss", "eval/accuracy", "eval/token_accuracy", "eval/loss_base", "train/tokens", "train/steps"):
        assert resumed[key] == straight[key], key
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("train/loss", "eval/loss"):
            if k in ra:
                assert ra[k] == rb[k], (ra["step"], k)


def test_resume_continues_the_same_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorabench.wandb_offline import find_offline_runs, read_offline_run

    real_log = Tracker.log

    def crashing_log(self: Tracker, metrics: dict, step: int) -> None:
        if step == 6 and "train/loss" in metrics:
            raise Interrupted("killed")
        real_log(self, metrics, step)

    monkeypatch.setattr(Tracker, "log", crashing_log)
    with pytest.raises(Interrupted):
        run_tiny(tmp_path, *RESUMABLE, "logger=wandb")
    first_id = (tmp_path / "wandb_run_id.txt").read_text()
    monkeypatch.setattr(Tracker, "log", real_log)
    run_tiny(tmp_path, *RESUMABLE, "logger=wandb")
    assert (tmp_path / "wandb_run_id.txt").read_text() == first_id
    runs = [read_offline_run(p, wait_for_exit=60) for p in find_offline_runs(tmp_path)]
    assert len(runs) == 2 and {r["run"]["id"] for r in runs} == {first_id}
    assert [r["exit_code"] for r in runs] == [1, 0]  # the interrupted segment was finished as failed
