"""The lightning-hydra-template shaped tree: hydra/ and paths/ dirs, debug/ presets that run,
the optimized metric a run returns, extras.print_config (hparams_search/: test_searches.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from lorabench.checks import register_configs, validate
from lorabench.cli import GROUPS, check_group_choices, print_config_tree, run_job
from tests.helpers import CONF, TINY, compose_cfg

TINY_MODEL = [o for o in TINY if o.startswith("model.")]  # the 64-wide random backbone only
STAMP = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"


def hydra_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra


# ---- hydra/ and paths/ ------------------------------------------------------------------------
def test_run_and_sweep_dirs_keep_their_names_under_paths_output_dir() -> None:
    h = hydra_cfg("strategy=qlora", "seed=3")
    assert re.fullmatch(rf"\./outputs/runs/{STAMP}_qlora_s3", h.run.dir), h.run.dir
    assert re.fullmatch(rf"\./outputs/multirun/{STAMP}", h.sweep.dir), h.sweep.dir
    assert OmegaConf.to_container(h.sweep)["subdir"] == "${hydra.job.num}_${strategy.name}_s${seed}"
    assert h.job.chdir is False
    moved = hydra_cfg("paths.output_dir=/elsewhere")
    assert moved.run.dir.startswith("/elsewhere/runs/") and moved.sweep.dir.startswith("/elsewhere/multirun/")


def test_debug_runs_go_to_their_own_dir() -> None:
    h = hydra_cfg("debug=default")
    assert re.fullmatch(rf"\./outputs/debug/{STAMP}_lora_s0", h.run.dir), h.run.dir


def test_cache_dir_comes_from_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "c"))
    cfg = compose_cfg()
    assert cfg.paths.cache_dir == cfg.model.cache_dir == str(tmp_path / "c")
    monkeypatch.delenv("LORABENCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compose_cfg().model.cache_dir == f"{tmp_path}/.cache/lorabench"
    cfg = compose_cfg("paths.cache_dir=/x/cache", "model=hf", "model.name_or_path=/m")
    assert cfg.model.cache_dir == "/x/cache"
    assert (cfg.paths.output_dir, cfg.paths.data_dir) == ("./outputs", "./data")


# ---- GROUPS -------------------------------------------------------------------------------------
def test_groups_know_every_config_group() -> None:
    dirs = {p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml")) and p.name != "hydra"}
    assert dirs == set(GROUPS)


@pytest.mark.parametrize("group", ["debug", "hparams_search", "paths", "extras"])
def test_unknown_choice_of_a_new_group_is_one_line(group: str) -> None:
    problem = check_group_choices([f"{group}=nope"], CONF)
    assert problem is not None and problem.startswith(f"{group}: unknown {group} 'nope', expected one of [")
    assert check_group_choices([f"{group}=default" if group != "hparams_search" else "hparams_search=lora_optuna"], CONF) is None


# ---- debug/ ---------------------------------------------------------------------------------------
def run_debug(tmp_path: Path, preset: str, *overrides: str) -> tuple[dict, list[dict]]:
    from lorabench.training import job

    cfg = compose_cfg(f"debug={preset}", *TINY_MODEL, *overrides)
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    validate(cfg)
    summary = job.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_debug_default_is_a_short_quiet_run_with_a_checkpoint(tmp_path: Path) -> None:
    cfg = compose_cfg("debug=default")
    assert (cfg.logger.backend, cfg.trainer.progress, cfg.trainer.max_steps) == ("none", False, 10)
    assert (cfg.task.train_size, cfg.task.eval_size) == (256, 32)
    summary, rows = run_debug(tmp_path, "default")
    assert summary["status"] == "completed" and summary["train/steps"] == 10
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["step"] == 5  # checkpoint_every=5: the last one before the end
    assert not (tmp_path / "wandb").exists()
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 11))


@pytest.mark.parametrize("strategy,fall", [("lora", 0.75), ("full", 2.0)])
def test_debug_overfit_trains_on_one_batch_and_the_loss_falls(tmp_path: Path, strategy: str, fall: float) -> None:
    """On the random 64-wide backbone (measured: lora 3.96 → 2.98, full 3.96 → 1.73 nats)."""
    cfg = compose_cfg("debug=overfit")
    assert cfg.task.train_size == cfg.trainer.batch_size == 8
    summary, rows = run_debug(tmp_path, "overfit", f"strategy={strategy}")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert summary["train/steps"] == len(losses) == 50
    assert losses[0] - losses[-1] > fall, (losses[0], losses[-1])
    assert losses[-1] == min(losses[-10:])  # still falling at the end: the lr does not decay


# ---- extras.print_config and optimized_metric ---------------------------------------------------
@pytest.fixture
def fake_job(monkeypatch: pytest.MonkeyPatch):
    """run_job around a job that returns a fixed summary (no training)."""
    from lorabench.training import job

    summary = {"strategy": "lora", "eval/accuracy": 0.25, "eval/loss": 1.5}
    monkeypatch.setattr(job, "run", lambda cfg: dict(summary))
    return summary


def tiny_root_cfg(*overrides: str):
    cfg = compose_cfg(*TINY, *overrides)
    with open_dict(cfg):
        cfg.run_dir = "/nowhere"
    return cfg


def test_print_config_prints_the_resolved_tree(fake_job, capsys: pytest.CaptureFixture) -> None:
    assert run_job(tiny_root_cfg("optim.lr=0.0123", "paths.cache_dir=/c/d")) == 0.25
    out = capsys.readouterr().out
    for line in ("lr: 0.0123", "cache_dir: /c/d", "name: lora", "max_steps: 6"):
        assert line in out, out
    assert "${" not in out  # resolved
    assert run_job(tiny_root_cfg("extras.print_config=false")) == 0.25
    assert capsys.readouterr().out == ""


def test_print_config_tree_has_one_branch_per_group(capsys: pytest.CaptureFixture) -> None:
    print_config_tree(tiny_root_cfg())
    out = capsys.readouterr().out.splitlines()
    branches = [ln.split("── ", 1)[1].strip() for ln in out if re.match(r"^[├└]── ", ln)]
    assert branches == list(tiny_root_cfg().keys())


def test_optimized_metric_is_read_from_the_summary(fake_job) -> None:
    assert run_job(tiny_root_cfg("optimized_metric=eval/loss", "extras.print_config=false")) == 1.5
    assert run_job(tiny_root_cfg("optimized_metric=eval/nope", "extras.print_config=false")) is None
    assert run_job(tiny_root_cfg("optimized_metric=null", "extras.print_config=false")) is None


