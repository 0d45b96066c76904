"""A job rerun into its run dir resumes from the checkpoint and ends with the same numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def test_a_refused_rewind_falls_back_to_resuming_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A W&B that refuses the rewind (an old server; seen offline on a loaded machine) still gets
    the run continued with resume='allow': wandb.init is called again with settings of its own."""
    import wandb

    from lorabench.wandb_offline import find_offline_runs, read_offline_run

    _crash_at(monkeypatch, 6, Interrupted("killed"))
    with pytest.raises(Interrupted):
        run_tiny(tmp_path, *RESUMABLE, "logger=wandb")
    monkeypatch.undo()
    real_init, calls = wandb.init, []

    def refusing_init(*args: Any, **kwargs: Any) -> Any:
        calls.append(sorted(k for k in ("resume", "resume_from") if k in kwargs))
        if "resume_from" in kwargs:
            kwargs["settings"].resume_from = kwargs["resume_from"]  # what wandb.init does to its settings
            raise ValueError("rewind is not supported")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", refusing_init)
    summary = run_tiny(tmp_path, *RESUMABLE, "logger=wandb")
    assert summary["status"] == "completed" and calls == [["resume_from"], ["resume"]]
    runs = [read_offline_run(p, wait_for_exit=60) for p in find_offline_runs(tmp_path)]
    assert [r["exit_code"] for r in runs] == [1, 0]


# ---- rerun rules: a run dir never mixes two runs nor redoes a finished one ---------------------------
def _crash_at(monkeypatch: pytest.MonkeyPatch, step: int, exc: BaseException) -> None:
    from lorabench.training.trainer import Trainer

    real = Trainer.train_step

    def crashing(self: Trainer) -> dict:
        if self.state.step == step:
            raise exc
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", crashing)


def test_a_completed_run_is_not_trained_again(tmp_path: Path) -> None:
    first = run_tiny(tmp_path, *RESUMABLE)
    before = (tmp_path / "metrics.jsonl").read_text()
    again = run_tiny(tmp_path, *RESUMABLE)
    assert again["already_completed"] and again["eval/loss"] == first["eval/loss"]
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing redone, nothing appended
    fresh = run_tiny(tmp_path, *RESUMABLE, "trainer.overwrite=true", "seed=1")
    assert "already_completed" not in fresh and fresh["seed"] == 1
    steps = [r["step"] for r in _rows(tmp_path) if "train/loss" in r]
    assert steps == list(range(1, 13))  # the old metrics were cleared first: no duplicate steps


def test_resume_under_another_config_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorabench.errors import ConfigError

    _crash_at(monkeypatch, 6, Interrupted("killed"))
    with pytest.raises(Interrupted):
        run_tiny(tmp_path, *RESUMABLE)
    monkeypatch.undo()
    ckpt = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"^strategy\.rank: the checkpoint .* strategy\.rank=8, this run has strategy\.rank=4") as e:
        run_tiny(tmp_path, *RESUMABLE, "strategy.rank=4")
    assert "\n" not in str(e.value)
    assert (tmp_path / "checkpoint.pt").read_bytes() == ckpt  # nothing overwritten
    resumed = run_tiny(tmp_path, *RESUMABLE, "trainer.progress=false")  # a display key may change
    assert resumed["status"] == "completed"


def test_a_torn_checkpoint_is_one_line_and_kept(tmp_path: Path) -> None:
    from lorabench.errors import ConfigError

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ConfigError, match=r"checkpoint.pt: cannot read this checkpoint") as e:
        run_tiny(tmp_path, *RESUMABLE)
    assert "\n" not in str(e.value)
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"PK\x03\x04 torn"


def test_ctrl_c_is_interrupted_and_a_completed_resume_leaves_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorabench.errors import Interrupted as JobInterrupted

    _crash_at(monkeypatch, 5, RuntimeError("boom"))  # a failure first: error.txt is written
    with pytest.raises(RuntimeError):
        run_tiny(tmp_path, *RESUMABLE)
    assert (tmp_path / "error.txt").exists()
    monkeypatch.undo()
    _crash_at(monkeypatch, 9, KeyboardInterrupt())
    with pytest.raises(JobInterrupted, match=r"^interrupted at step 9; the last checkpoint is step 8 in "):
        run_tiny(tmp_path, *RESUMABLE)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == 9
    monkeypatch.undo()
    assert run_tiny(tmp_path, *RESUMABLE)["status"] == "completed"
    assert not (tmp_path / "error.txt").exists()
    steps = [r["step"] for r in _rows(tmp_path) if "train/loss" in r]
    assert steps == list(range(1, 13))  # each step once, across three attempts


def test_rows_the_wandb_record_lost_are_logged_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local W&B record lost its tail (as a SIGKILL leaves it: a torn last record, and rows
    before the checkpoint's step missing): the rerun rewinds to the last row it holds, K < the
    checkpoint's step 8, and logs metrics.jsonl's rows after K again, so the merged history equals
    metrics.jsonl row for row."""
    from lorabench.wandb_offline import find_offline_runs, merged_history, read_offline_run

    _crash_at(monkeypatch, 10, Interrupted("killed"))
    with pytest.raises(Interrupted):
        run_tiny(tmp_path, *RESUMABLE, "logger=wandb")
    monkeypatch.undo()
    path = find_offline_runs(tmp_path)[0]
    read_offline_run(path, wait_for_exit=60)
    raw = path.read_bytes()
    size = len(raw)
    while size > 0:  # cut the record mid-way through its rows, not at a record boundary
        size -= 37
        path.write_bytes(raw[:size])
        kept = [h["_step"] for h in read_offline_run(path)["history"]]
        if kept and max(kept) < 6:
            break
    assert kept == list(range(max(kept) + 1))  # the rows before the cut are all there
    run_tiny(tmp_path, *RESUMABLE, "logger=wandb")
    second = read_offline_run(find_offline_runs(tmp_path)[1], wait_for_exit=60)
    assert second["run"]["branch_point"]["value"] == max(kept)
    history = merged_history(tmp_path)
    by_step: dict[int, dict] = {}
    for r in _rows(tmp_path):
        by_step.setdefault(r["step"], {}).update(r)
    assert [h["_step"] for h in history] == sorted(by_step)  # every step once: no hole, nothing twice
    for h in history:
        assert {k: h[k] for k in ("train/loss", "eval/loss") if k in h} == \
            {k: by_step[h["_step"]][k] for k in ("train/loss", "eval/loss") if k in by_step[h["_step"]]}


STEPS = RESUMABLE[:3]  # without strategy.dropout, which full fine-tuning has not


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("finished", [True, False])
def test_a_rerun_under_another_config_is_refused_and_the_dir_left_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                            finished: bool) -> None:
    """`strategy=full` rerun into a lora run dir (completed, or stopped with a checkpoint): one line
    naming strategy.name, and every file of the dir as it was, Hydra's .hydra/ files included
    (Hydra rewrites them before the job starts; `admit` puts them back). An identical rerun passes."""
    from lorabench.errors import RunDirRefused
    from lorabench.training.run_dir import RUN_RECORD, admit
    from tests.helpers import tiny_cfg

    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "config.yaml").write_text("strategy:\n  name: lora\n")  # stands for what Hydra wrote
    admit(tiny_cfg(tmp_path, *STEPS), ".hydra")
    assert json.loads((tmp_path / RUN_RECORD).read_text())["hydra_files"] == {".hydra/config.yaml": "strategy:\n  name: lora\n"}
    if not finished:
        _crash_at(monkeypatch, 6, Interrupted("killed"))
    try:
        run_tiny(tmp_path, *STEPS)
    except Interrupted:
        pass
    monkeypatch.undo()
    before = _snapshot(tmp_path)
    (hydra / "config.yaml").write_text("strategy:\n  name: full\n")  # Hydra's rewrite for the rerun
    with pytest.raises(RunDirRefused) as e:
        admit(tiny_cfg(tmp_path, *STEPS, "strategy=full"), ".hydra")
    what = "a completed run" if finished else "an unfinished run"
    assert str(e.value).startswith(f"strategy.name: {tmp_path} holds {what} with strategy.name=lora, this run has "
                                   "strategy.name=full; ")
    assert "\n" not in str(e.value)
    assert _snapshot(tmp_path) == before
    admit(tiny_cfg(tmp_path, *STEPS, "trainer.progress=true"), ".hydra")  # the same run (a display key may change)
    if finished:
        assert _snapshot(tmp_path) == before
        assert run_tiny(tmp_path, *STEPS)["already_completed"]
    else:
        assert run_tiny(tmp_path, *STEPS)["status"] == "completed"
