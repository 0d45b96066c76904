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


# ---- a submitit_local sweep: one job preempted (requeued by submitit), one killed, then a rerun -----------
# Loaded by every Python process of the sweep through PYTHONPATH: for the job whose run dir name starts
# with the given prefix, it sends the given signal to its own process in the middle of the given step.
SIGNAL_HOOK = textwrap.dedent('''
    import os
    plan = os.environ.get("LORABENCH_TEST_SIGNALS")
    if plan:
        import signal
        from pathlib import Path
        from lorabench.training.trainer import Trainer

        targets = {}
        for item in plan.split(","):
            prefix, step, name = item.split(":")
            targets[prefix] = (int(step), getattr(signal, name))
        real = Trainer.train_step

        def train_step(self):
            for prefix, (step, sig) in targets.items():
                if self.run_dir is not None and Path(self.run_dir).name.startswith(prefix) and self.state.step == step:
                    os.kill(os.getpid(), sig)
            return real(self)

        Trainer.train_step = train_step
''')
SWEEP = [*TINY, *RESUMABLE, "seed=0,1", "extras.print_config=false"]


def signal_hook(tmp_path: Path) -> Path:
    """A dir whose sitecustomize.py delivers LORABENCH_TEST_SIGNALS inside the job processes."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGNAL_HOOK)
    return hook


def run_sweep(sweep_dir: Path, hook_dir: Path, signals: str = "", launcher: str = "submitit_local") -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": f"{hook_dir}{os.pathsep}{REPO}",
           "LORABENCH_TEST_SIGNALS": signals}
    cmd = [sys.executable, "-m", "lorabench", "-m", *SWEEP, f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                          timeout=900)


def assert_uninterrupted(job: Path, tmp_path: Path, seed: int) -> None:
    """`job` ended with the final numbers and metrics.jsonl of the same job run straight through."""
    straight = run_tiny(tmp_path / f"straight{seed}", *RESUMABLE, f"seed={seed}")
    summary = json.loads((job / "summary.json").read_text())
    assert {k: summary[k] for k in FINAL_KEYS} == {k: straight[k] for k in FINAL_KEYS}
    assert comparable(job) == comparable(tmp_path / f"straight{seed}")


@pytest.mark.slow
def test_submitit_sweep_preempted_and_killed_jobs_end_as_uninterrupted_runs(tmp_path: Path) -> None:
    """Job 0 gets submitit's preemption signal (SIGUSR2) mid step 6: it checkpoints at step 6 and
    submitit requeues it in the same sweep. Job 1 is SIGKILLed mid step 6 (checkpoint at step 4):
    the sweep lists it as missing/killed and exits 1; the rerun skips job 0 and resumes job 1."""
    hook = signal_hook(tmp_path)
    sweep = tmp_path / "sweep"
    first = run_sweep(sweep, hook, signals="0_:5:SIGUSR2,1_:5:SIGKILL")
    out = first.stdout
    assert first.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    assert "lorabench: error: job 1 died without a result (submitit job " in out
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.err"))
    assert f"lorabench: stopped by SIGUSR2 at step 6; checkpoint at step 6 in {sweep / '0_lora_s0'}; " \
           "requeued through submitit" in logs
    assert json.loads((sweep / "0_lora_s0" / "summary.json").read_text())["status"] == "completed"
    assert not (sweep / "1_lora_s1" / "summary.json").exists()
    assert [r["step"] for r in rows(sweep / "1_lora_s1") if "train/loss" in r] == [1, 2, 3, 4, 5]
    csv = pd.read_csv(sweep / "sweep_summary.csv")
    assert list(csv["status"]) == ["completed", "missing/killed"]
    assert "lorabench: 1 of 2 jobs failed" in out
    job0 = (sweep / "0_lora_s0" / "metrics.jsonl").read_bytes()

    second = run_sweep(sweep, hook)
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"lorabench: {sweep / '0_lora_s0'} holds a completed run; not training it again" in \
        "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.err"))
    assert (sweep / "0_lora_s0" / "metrics.jsonl").read_bytes() == job0  # skipped: nothing redone
    assert list(pd.read_csv(sweep / "sweep_summary.csv")["status"]) == ["completed", "completed"]
    for seed in (0, 1):  # the same jobs, uninterrupted
        assert_uninterrupted(sweep / f"{seed}_lora_s{seed}", tmp_path, seed)


@pytest.mark.slow
def test_sigterm_to_a_single_run_is_one_line_exit_143_and_the_rerun_completes(tmp_path: Path) -> None:
    hook = signal_hook(tmp_path)
    run_dir = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
    cmd = [sys.executable, "-m", "lorabench", *TINY, *RESUMABLE, "extras.print_config=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**env, "LORABENCH_TEST_SIGNALS": "run:2:SIGTERM"})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lorabench: stopped by SIGTERM at step 3; checkpoint at step 3 in {run_dir}; resume with: lorabench ")
    assert last.endswith(f"hydra.run.dir={run_dir}")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == list(range(1, 11))


@pytest.mark.slow
def test_sigterm_to_a_joblib_job_records_it_preempted_and_the_others_run(tmp_path: Path) -> None:
    hook = signal_hook(tmp_path)
    sweep = tmp_path / "sweep"
    proc = run_sweep(sweep, hook, signals="0_:5:SIGTERM", launcher="joblib")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"lorabench: job 0 stopped by SIGTERM at step 6; checkpoint at step 6 in {sweep / '0_lora_s0'}; " \
           "rerun the sweep to resume it" in proc.stdout
    assert list(pd.read_csv(sweep / "sweep_summary.csv")["status"]) == ["preempted", "completed"]
    again = run_sweep(sweep, hook, launcher="joblib")
    assert again.returncode == 0, again.stdout[-3000:]
    assert_uninterrupted(sweep / "0_lora_s0", tmp_path, 0)


@pytest.mark.slow
def test_a_sigkilled_joblib_worker_costs_its_own_job_not_the_sweep(tmp_path: Path) -> None:
    """Job 1's worker is SIGKILLed mid step 6 (checkpoint at step 4) every time it gets there (an OOM
    that recurs): loky breaks its pool, the launcher relaunches the unfinished jobs once, then runs
    them one at a time, each alone; job 0 ends as an uninterrupted run whichever round finished it,
    job 1 is listed missing/killed, exit 1, no traceback; a rerun resumes it."""
    hook = signal_hook(tmp_path)
    sweep = tmp_path / "sweep"
    proc = run_sweep(sweep, hook, signals="1_:5:SIGKILL", launcher="joblib")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    assert "lorabench: a joblib worker died (" in out and "relaunching the unfinished jobs once" in out
    assert "lorabench: a joblib worker died again (" in out and "going on one job at a time" in out
    assert "lorabench: job 1's worker died when it ran alone (" in out and "job 0's worker" not in out
    assert list(pd.read_csv(sweep / "sweep_summary.csv")["status"]) == ["completed", "missing/killed"]
    assert_uninterrupted(sweep / "0_lora_s0", tmp_path, 0)
    assert [r["step"] for r in rows(sweep / "1_lora_s1") if "train/loss" in r] == [1, 2, 3, 4, 5]

    again = run_sweep(sweep, hook, launcher="joblib")
    assert again.returncode == 0, again.stdout[-3000:]
    assert_uninterrupted(sweep / "1_lora_s1", tmp_path, 1)


# ---- Ctrl-C (SIGINT): whatever disposition the job inherited, it stops with a resumable checkpoint ------
def sigint_at(monkeypatch: pytest.MonkeyPatch, point: str) -> dict:
    """Send SIGINT to this process at `point` of a RESUMABLE job; returns {"scored": n}: evaluations
    that ran to the end after the signal (0 = an interrupted evaluation stopped at once)."""
    import lorabench.training.job as job_mod
    import lorabench.training.trainer as trainer_mod

    seen = {"scored": 0, "sent": False, "evals": 0}

    def send() -> None:
        seen["sent"] = True
        os.kill(os.getpid(), signal.SIGINT)

    if point == "load":
        real_load = job_mod.load_backbone

        def load(*a: object, **k: object) -> object:
            send()
            return real_load(*a, **k)

        monkeypatch.setattr(job_mod, "load_backbone", load)
    elif point == "first step":
        real_step = Trainer.train_step

        def step(self: Trainer) -> dict:
            if self.state.step == 0:
                send()
            return real_step(self)

        monkeypatch.setattr(Trainer, "train_step", step)
    elif point == "checkpoint write":
        real_save = trainer_mod.atomic_torch_save

        def save(obj: object, path: Path) -> None:
            if not seen["sent"]:
                send()
            real_save(obj, path)

        monkeypatch.setattr(trainer_mod, "atomic_torch_save", save)
    elif point == "eval":
        real_eval = trainer_mod.evaluate

        def evaluate(*a: object, **k: object) -> dict:
            seen["evals"] += 1
            if seen["evals"] == 3:  # base, step 4, step 8: the one at step 8
                send()
            out = real_eval(*a, **k)
            seen["scored"] += seen["sent"]
            return out

        monkeypatch.setattr(trainer_mod, "evaluate", evaluate)
    return seen


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    run_dir = tmp_path_factory.mktemp("straight")
    return run_tiny(run_dir, *RESUMABLE), run_dir


# point → (the step reached, the last checkpoint's step) in the one line (RESUMABLE: checkpoints and
# evaluations every 4 steps; the evaluation at step 8 runs before that step's checkpoint)
SIGINT_POINTS = {"load": (0, None), "first step": (1, 1), "checkpoint write": (4, 4), "eval": (8, 4)}


@pytest.mark.parametrize("inherited", ["SIG_IGN", "default_int_handler"])
@pytest.mark.parametrize("point", list(SIGINT_POINTS))
def test_sigint_stops_with_a_resumable_checkpoint_whatever_the_inherited_disposition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight_run: tuple[dict, Path], inherited: str, point: str
) -> None:
    """A job that inherited SIGINT as ignored (started in the background by a non-interactive shell)
    stops on it as one with Python's default does. In a step or a checkpoint write it is deferred to
    the step boundary (a checkpoint at that step); in loading and evaluation it stops at once."""
    import torch

    from lorabench.errors import Interrupted

    disposition = getattr(signal, inherited)
    signal.signal(signal.SIGINT, disposition)
    try:
        seen = sigint_at(monkeypatch, point)
        step, ckpt = SIGINT_POINTS[point]
        where = f"the last checkpoint is step {ckpt} in {tmp_path}" if ckpt is not None else "no checkpoint was written yet"
        with pytest.raises(Interrupted) as e:
            run_tiny(tmp_path, *RESUMABLE)
        assert str(e.value) == f"interrupted at step {step}; {where}"
        assert type(e.value) is Interrupted  # not Preempted: Ctrl-C is never requeued
        assert signal.getsignal(signal.SIGINT) is disposition  # the inherited disposition is back
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert seen["scored"] == 0  # an evaluation under way when SIGINT came did not run to its end
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("interrupted", step)
    if ckpt is None:
        assert not (tmp_path / "checkpoint.pt").exists()
    else:  # complete and readable: the write it arrived in was not cut
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["step"] == ckpt
    monkeypatch.undo()
    straight, straight_dir = straight_run
    resumed = run_tiny(tmp_path, *RESUMABLE)
    assert resumed["status"] == "completed"
    assert {k: resumed[k] for k in FINAL_KEYS} == {k: straight[k] for k in FINAL_KEYS}
    assert comparable(tmp_path) == comparable(straight_dir)


def test_sigint_while_a_resume_loads_names_the_checkpoint_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorabench.errors import Interrupted

    sigint_at(monkeypatch, "first step")
    with pytest.raises(Interrupted, match=r"^interrupted at step 1; the last checkpoint is step 1 in "):
        run_tiny(tmp_path, *RESUMABLE)
    monkeypatch.undo()
    sigint_at(monkeypatch, "load")  # the rerun is stopped before its trainer has read the checkpoint
    with pytest.raises(Interrupted) as e:
        run_tiny(tmp_path, *RESUMABLE)
    assert str(e.value) == f"interrupted at step 1; the last checkpoint is step 1 in {tmp_path}"


# ---- SIGKILL: the W&B history of the resumed run equals an uninterrupted run's -------------------------
KILLED = [*TINY, "trainer.max_steps=12", "trainer.checkpoint_every=4", "trainer.eval_every=4", "trainer.log_every=2",
          "trainer.threads=1", "logger=wandb", "extras.print_config=false"]


def history_without_timing(run_dir: Path) -> list[dict]:
    """merged_history's rows, without the fields that differ between two runs of the same job."""
    from lorabench.wandb_offline import merged_history

    timing = ("_runtime", "_timestamp", "_seconds", "_per_second")
    return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in merged_history(run_dir, wait_for_exit=60)]


@pytest.mark.slow
def test_sigkill_past_a_checkpoint_leaves_no_hole_in_the_wandb_history(tmp_path: Path, spawn) -> None:
    """SIGKILLed mid step 7 (checkpoint at 4; steps 2, 4, 6 logged): the rows its W&B service had
    not written are lost with it, the checkpoint's among them. The rerun rewinds W&B to the last
    row the local record holds and logs metrics.jsonl's rows after it again: the merged history is
    the uninterrupted run's, row for row and value for value (timing fields aside)."""
    from lorabench.wandb_offline import find_offline_runs, read_offline_run

    hook = signal_hook(tmp_path)
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": f"{hook}{os.pathsep}{REPO}", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "lorabench", *KILLED]
    killed = spawn([*cmd, f"hydra.run.dir={run_dir}"], env={**env, "LORABENCH_TEST_SIGNALS": "run:6:SIGKILL"}, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert killed.wait() == -signal.SIGKILL
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == [2, 4, 6]
    first = read_offline_run(find_offline_runs(run_dir)[0])
    lost = [s for s in (0, 2, 4) if s not in [h["_step"] for h in first["history"]]]
    proc = spawn([*cmd, f"hydra.run.dir={run_dir}"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE, text=True)
    assert proc.wait() == 0, proc.stderr.read()[-3000:]
    run_tiny(straight, *KILLED)  # the same job, uninterrupted (in this process: the same numbers)
    resumed = history_without_timing(run_dir)
    assert [r["_step"] for r in resumed] == [0, 2, 4, 6, 8, 10, 12]
    assert resumed == history_without_timing(straight)
    print(f"rows of steps <= 4 the kill lost from the W&B record: {lost}; merged history steps "
          f"{[r['_step'] for r in resumed]}")
