"""Launcher presets (conf/hydra/launcher/): submitit_local really runs a sweep as subprocesses through
submitit; the SLURM preset composes with its documented keys (no cluster here); joblib = parallel."""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from lorabench.checks import register_configs
from tests.helpers import CONF, REPO, TINY


def hydra_launcher(*overrides: str) -> DictConfig:
    """The composed `hydra.launcher` node for `overrides`."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.launcher


def test_submitit_local_runs_each_job_in_its_own_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "LORABENCH_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "1"}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lorabench", "-m", "hydra/launcher=submitit_local", *TINY,
           "trainer.max_steps=2", "logger=none", "strategy=lora,full", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["0_lora_s0", "1_full_s0"]
    assert [s["status"] for s in summaries.values()] == ["completed", "completed"]
    assert {s["strategy"] for s in summaries.values()} == {"lora", "full"}
    # submitit's local executor: one job id (the child's pid) per job, each with its own log files
    job_dirs = [d for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]
    assert len(job_dirs) == 2 and os.getpid() not in {int(d.name) for d in job_dirs}
    for d in job_dirs:
        assert (d / f"{d.name}_0_log.out").exists() and (d / f"{d.name}_0_log.err").exists()


def test_submitit_slurm_preset_has_the_documented_keys() -> None:
    launcher = hydra_launcher("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu")
    assert launcher._target_ == "hydra_plugins.lorabench_launchers.submitit_launchers.SlurmLauncher"
    keys = {
        "partition": "gpu", "gpus_per_node": 1, "tasks_per_node": 1, "nodes": 1, "cpus_per_task": 4,
        "mem_gb": 32, "timeout_min": 240, "signal_delay_s": 120, "max_num_timeout": 3,
        "array_parallelism": 256, "setup": [],
    }
    assert {k: OmegaConf.to_object(launcher[k]) if OmegaConf.is_config(launcher[k]) else launcher[k]
            for k in keys} == keys
    # the first line is the copy-paste command, and every key carries a comment
    lines = (CONF / "hydra/launcher/submitit_slurm.yaml").read_text().splitlines()
    assert lines[0].startswith("# lorabench -m hydra/launcher=submitit_slurm ")
    key_lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert key_lines and all("  # " in ln for ln in key_lines)


def test_joblib_and_parallel_are_the_same_local_process_launcher() -> None:
    joblib, parallel = hydra_launcher("hydra/launcher=joblib"), hydra_launcher("hydra/launcher=parallel")
    assert OmegaConf.to_container(joblib) == OmegaConf.to_container(parallel)
    assert joblib._target_.endswith("JoblibLauncher")
    assert (joblib.prefer, joblib.n_jobs, joblib.require) == ("processes", 2, None)


def test_slurm_launcher_without_slurm_is_one_line() -> None:
    """On a machine without `srun`, the SLURM preset is refused before Hydra starts."""
    import shutil
    import subprocess
    import sys

    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    proc = subprocess.run([sys.executable, "-m", "lorabench", "-m", "hydra/launcher=submitit_slurm", "seed=0,1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "lorabench: error: hydra/launcher=submitit_slurm: no `srun` on this machine; launch from a SLURM login node "
        "(hydra/launcher=submitit_local runs the same code path locally)"
    ]
