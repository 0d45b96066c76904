"""Searches: the Optuna presets (one per strategy) and a search whose invalid trials are recorded
instead of ending the study; the W&B sweep files (W&B's schema and our own key check); a job
under a fake `wandb agent` (the agent's own code launches it) keeps one W&B run and the resolved
config, and a parameter that never reached Hydra is one line."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from jsonschema.validators import validator_for
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lorabench.checks import register_configs, validate
from lorabench.errors import ConfigError
from lorabench.training.search import trial_outcome
from lorabench.wandb_agent import adopt_agent_run, agent_config, sweep_problems
from lorabench.wandb_offline import find_offline_runs, read_offline_run
from tests.helpers import CONF, REPO, TINY, compose_cfg

PRESETS = {"lora": 3e-3, "qlora": 3e-3, "qalora": 2e-3, "relora": 3e-3, "full": 5e-4}  # strategy: tuned lr
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def hydra_cfg(*overrides: str) -> Any:
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra


# ---- Optuna presets ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", sorted(PRESETS))
def test_optuna_preset_searches_lr_rank_alpha_of_its_strategy(strategy: str) -> None:
    name = f"{strategy}_optuna"
    lines = (CONF / "hparams_search" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_" and lines[1].startswith(f"# Run: lorabench hparams_search={name}")
    h = hydra_cfg(f"hparams_search={name}")
    assert h.mode.name == "MULTIRUN" and h.sweeper.direction == "maximize"
    assert h.sweeper._target_ == "hydra_plugins.lorabench_sweepers.optuna_recording.RecordingOptunaSweeper"
    assert h.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    params = dict(h.sweeper.params)
    expected = {"optim.lr"} if strategy == "full" else {"optim.lr", "strategy.rank", "strategy.alpha"}
    assert set(params) == expected
    tuned = PRESETS[strategy]
    assert params["optim.lr"].startswith("tag(log, interval(")  # log-uniform, a decade either side of the tuned lr
    assert space_values(params["optim.lr"]) == pytest.approx([tuned / 10, tuned * 10])
    cfg = compose_cfg(f"hparams_search={name}")
    assert cfg.strategy.name == strategy and cfg.strategy.lr == pytest.approx(tuned)
    assert cfg.optimized_metric == "eval/accuracy"
    # the smallest and the largest values of the space compose and validate (no trial fails on the preset's own values)
    for pick in (min, max):
        overrides = [f"{k}={pick(space_values(v)):g}" for k, v in params.items()]
        validate(compose_cfg(f"hparams_search={name}", *overrides))


def space_values(spec: str) -> list[float]:
    """The numbers in an Optuna sweep spec: choice(2, 4) → [2, 4]; tag(log, interval(a, b)) → [a, b]."""
    inner = spec[spec.rindex("(") + 1 : spec.index(")")]
    return [float(x) for x in inner.split(",")]


def job_return(status: JobStatus, value: Any) -> JobReturn:
    ret = JobReturn(overrides=["strategy.rank=0"], status=status)
    ret.return_value = value
    return ret


def test_trial_outcomes_complete_pruned_failed() -> None:
    ok = trial_outcome(job_return(JobStatus.COMPLETED, 0.25), 1)
    assert (ok.state, ok.values) == (TrialState.COMPLETE, [0.25])
    for bad in (float("nan"), float("inf"), None, "n/a"):
        out = trial_outcome(job_return(JobStatus.COMPLETED, bad), 1)
        assert out.state == TrialState.PRUNED and out.values is None and out.reason, bad
    invalid = trial_outcome(job_return(JobStatus.FAILED, ConfigError("strategy.rank: must be a positive integer, got 0")), 1)
    assert (invalid.state, invalid.reason) == (TrialState.PRUNED, "strategy.rank: must be a positive integer, got 0")
    crash = trial_outcome(job_return(JobStatus.FAILED, RuntimeError("CUDA out of memory")), 1)
    assert (crash.state, crash.reason) == (TrialState.FAIL, "RuntimeError: CUDA out of memory")
    assert trial_outcome(job_return(JobStatus.COMPLETED, (0.5, 2.0)), 2).values == [0.5, 2.0]


class ScriptedLauncher:
    """Stands in for a Hydra launcher: returns scripted (status, value) outcomes, one per trial."""

    def __init__(self, outcomes: list[tuple[JobStatus, Any]]) -> None:
        self.outcomes, self.launched = list(outcomes), []

    def launch(self, overrides: list[tuple[str, ...]], initial_job_idx: int) -> list[JobReturn]:
        self.launched += [list(o) for o in overrides]
        return [job_return(*self.outcomes.pop(0)) for _ in overrides]


def scripted_sweeper(cls: type, tmp_path: Path, outcomes: list[tuple[JobStatus, Any]]) -> Any:
    import optuna

    sweeper = cls(sampler=optuna.samplers.TPESampler(seed=0), direction="minimize", storage=None, study_name="t",
                  n_trials=len(outcomes), n_jobs=1, search_space=None, custom_search_space=None,
                  params=OmegaConf.create({"strategy.rank": "choice(2, 4, 8)"}))
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweeper.launcher, sweeper.hydra_context, sweeper.job_idx = ScriptedLauncher(outcomes), object(), 0
    return sweeper


def test_plugin_alone_ends_the_study_at_a_bad_trial_ours_records_it(tmp_path: Path) -> None:
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    from lorabench.training.search import RecordingOptunaSweeperImpl

    script = [(JobStatus.COMPLETED, 0.5), (JobStatus.FAILED, ConfigError("strategy.rank: bad")),
              (JobStatus.COMPLETED, float("nan")), (JobStatus.FAILED, RuntimeError("killed")),
              (JobStatus.COMPLETED, 0.25)]
    plugin = scripted_sweeper(OptunaSweeperImpl, tmp_path / "plugin", script)
    with pytest.raises(ConfigError):
        plugin.sweep([])
    assert len(plugin.launcher.launched) == 2  # trials 3-5 never ran, and no results file
    assert not (tmp_path / "plugin" / "optimization_results.yaml").exists()
    ours = scripted_sweeper(RecordingOptunaSweeperImpl, tmp_path / "ours", script)
    ours.sweep([])
    assert len(ours.launcher.launched) == 5
    result = yaml.safe_load((tmp_path / "ours" / "optimization_results.yaml").read_text())
    assert [t["state"] for t in result["trials"]] == ["COMPLETE", "PRUNED", "PRUNED", "FAIL", "COMPLETE"]
    assert [t.get("value") for t in result["trials"]] == [0.5, None, None, None, 0.25]
    assert [t["reason"] for t in result["trials"][1:4]] == [
        "strategy.rank: bad", "the objective is not finite (nan)", "RuntimeError: killed"]
    assert [t["params"]["strategy.rank"] for t in result["trials"]] == [
        int(o[0].split("=")[1]) for o in ours.launcher.launched]
    assert result["best_value"] == 0.25 and result["best_params"] == result["trials"][4]["params"]
    assert result["n_trials"] == {"COMPLETE": 2, "PRUNED": 2, "FAIL": 1}


def test_search_with_invalid_trials_records_every_trial_and_keeps_going(tmp_path: Path) -> None:
    """4 trials over rank ∈ {0, 2}: rank 0 fails validation. The study does not stop there (the
    plugin alone re-raises and ends it); every trial is in optimization_results.yaml with its state,
    the best value is the smallest completed trial's eval/loss, and sweep_summary.csv agrees."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "LORABENCH_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "lorabench", "hparams_search=lora_optuna", *TINY, "trainer.max_steps=2",
           "hydra.sweeper.n_trials=4", "strategy.rank=choice(0,2)", "hydra.sweeper.direction=minimize",
           "optimized_metric=eval/loss", "extras.print_config=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "setup plugin alembic" not in proc.stdout + proc.stderr  # optuna's import is quiet
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = result["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3] and [t["job"] for t in trials] == [0, 1, 2, 3]
    summaries = {t["number"]: json.loads((sweep / t["run_dir"] / "summary.json").read_text()) for t in trials}
    for t in trials:
        s = summaries[t["number"]]
        assert t["run_dir"].startswith(f"{t['job']}_lora_s0")
        if t["params"]["strategy.rank"] == 0:
            assert t["state"] == "PRUNED" and "value" not in t
            assert t["reason"] == "strategy.rank: must be a positive integer, got 0"
            assert s["status"] == "failed" and s["error"] == t["reason"]
        else:
            assert t["state"] == "COMPLETE" and s["status"] == "completed"
            assert t["value"] == s["eval/loss"] and s["strategy/rank"] == 2
            assert math.isclose(t["params"]["optim.lr"], float(dict(o.split("=", 1) for o in s["overrides"])["optim.lr"]))
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert complete and pruned  # the seeded sampler drew both ranks
    assert result["n_trials"] == {"COMPLETE": len(complete), "PRUNED": len(pruned), "FAIL": 0}
    best = min(complete, key=lambda t: t["value"])
    assert result["best_value"] == best["value"] and result["best_params"] == best["params"]
    csv = pd.read_csv(sweep / "sweep_summary.csv")
    assert list(csv["job"]) == [0, 1, 2, 3]
    assert list(csv["status"]) == ["failed" if t["state"] == "PRUNED" else "completed" for t in trials]
    assert proc.returncode == 1  # failed jobs make the sweep's exit code say so, as for any multirun
    assert f"lorabench: {len(pruned)} of 4 jobs failed" in proc.stderr


# ---- W&B sweep files ---------------------------------------------------------------------------
def wandb_schema_validator() -> Any:
    """W&B's sweep-config JSON schema, as shipped in the `sweeps` package (read, not imported)."""
    spec = importlib.util.find_spec("sweeps")
    assert spec and spec.submodule_search_locations, "pip install -e '.[dev]' (the sweeps package)"
    schema = json.loads((Path(spec.submodule_search_locations[0]) / "config" / "schema.json").read_text())
    return validator_for(schema)(schema)


def test_sweep_files_exist() -> None:
    names = {p.name for p in SWEEPS}
    assert {"strategy_rank_seed_grid.yaml", "lr_bayes.yaml", "lr_grid.yaml"} <= names
    grid = yaml.safe_load((REPO / "sweeps" / "strategy_rank_seed_grid.yaml").read_text())
    assert grid["method"] == "grid" and list(grid["parameters"]) == ["strategy", "strategy.rank", "seed"]
    bayes = yaml.safe_load((REPO / "sweeps" / "lr_bayes.yaml").read_text())
    assert bayes["method"] == "bayes" and list(bayes["parameters"]) == ["optim.lr"]
    assert bayes["parameters"]["optim.lr"]["distribution"] == "log_uniform_values"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_file_fits_wandbs_schema_and_lorabenchs_keys(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# Run: wandb sweep sweeps/{path.name} && wandb agent")
    leaves = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#") and not ln.rstrip().endswith(":")]
    assert all(" # " in ln for ln in leaves), [ln for ln in leaves if " # " not in ln]
    sweep = yaml.safe_load(path.read_text())
    assert [e.message for e in wandb_schema_validator().iter_errors(sweep)] == []
    assert sweep_problems(sweep, compose_cfg(), CONF) == []
    assert sweep["program"] == "lorabench" and sweep["metric"]["name"] == "eval/accuracy"
    # every value of every axis (value i of each axis in point i), rendered by W&B's own command
    # builder, composes and validates in lorabench
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    axes = {k: v.get("values", [v.get("min"), v.get("max")]) for k, v in sweep["parameters"].items()}
    fixed = [c for c in sweep["command"] if "=" in str(c) and not str(c).startswith("logger.")]
    for i in range(max(map(len, axes.values()))):
        point = [values[i % len(values)] for values in axes.values()]
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in zip(axes, point)}})
        validate(compose_cfg(*fixed, *args["args_no_hyphens"]))


def test_sweep_file_with_an_unknown_parameter_is_rejected_in_one_line() -> None:
    sweep = yaml.safe_load((REPO / "sweeps" / "strategy_rank_seed_grid.yaml").read_text())
    sweep["parameters"]["strategy.rnak"] = sweep["parameters"].pop("strategy.rank")
    assert list(wandb_schema_validator().iter_errors(sweep)) == []  # W&B's schema cannot tell
    cfg = compose_cfg()
    assert sweep_problems(sweep, cfg, CONF) == [
        f"parameters.strategy.rnak: not a lorabench config key (nor a config group in {CONF})"]
    sweep["parameters"]["strategy"]["values"].append("lorra")
    sweep["command"] = ["${program}", "${args}"]
    assert sweep_problems(sweep, cfg, CONF) == [
        "command: must contain ${args_no_hyphens} (W&B's `--key=value` args are not Hydra overrides)",
        f"parameters.strategy: unknown strategy ['lorra'], expected some of {sorted(p.stem for p in (CONF / 'strategy').glob('*.yaml'))}",
        f"parameters.strategy.rnak: not a lorabench config key (nor a config group in {CONF})"]


# ---- under `wandb agent` -----------------------------------------------------------------------
AGENT_PARAMS = {"strategy": "qlora", "strategy.rank": 4, "seed": 1}


def nest_dotted_keys(config: dict[str, Any], drop: set[str]) -> dict[str, Any]:
    """The run config with `drop` and wandb's own `_wandb` left out and dotted keys nested again."""
    out: dict[str, Any] = {}
    for key, value in sorted(config.items(), key=lambda kv: kv[0].count(".")):
        if key in drop or key == "_wandb":
            continue
        *path, leaf = key.split(".")
        target = out
        for part in path:
            target = target.setdefault(part, {})
        assert target.get(leaf, value) == value, key  # a dotted key never contradicts the nested one
        target[leaf] = value
    return out


def test_agent_job_keeps_its_one_run_and_the_resolved_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb's Agent launches the grid file's command for one grid point (its own param file, env
    and command rendering; no server). The job's W&B run is the agent's run id, the only run in
    the run dir, finished with exit code 0; its config is the resolved config (the strategy node
    the sweep's `strategy: qlora` replaced is back as strategy.* keys) plus the sweep's keys."""
    from wandb.wandb_agent import Agent

    sweep = yaml.safe_load((REPO / "sweeps" / "strategy_rank_seed_grid.yaml").read_text())
    run_dir = tmp_path / "run"
    tiny = [o.replace("logger=none", "logger=wandb") for o in TINY]
    extra = [*tiny, "trainer.max_steps=2", "extras.print_config=false", f"hydra.run.dir={run_dir}"]
    for name, value in (("WANDB_SWEEP_ID", "swp123"), ("WANDB_RUN_ID", "unset"), ("WANDB_SWEEP_PARAM_PATH", "unset"),
                        ("WANDB_DIR", str(tmp_path)), ("WANDB_MODE", "offline"), ("LORABENCH_CACHE", str(tmp_path / "c"))):
        monkeypatch.setenv(name, value)  # the agent overwrites some in os.environ; monkeypatch restores them all
    monkeypatch.chdir(REPO)
    agent = Agent(api=None, queue=None, sweep_id="swp123")
    agent._sweep_command = [c.replace("logger.mode=online", "logger.mode=offline") for c in sweep["command"]] + extra
    agent._command_run({"run_id": "agentrun1", "program": sweep["program"],
                        "args": {k: {"value": v} for k, v in AGENT_PARAMS.items()}})
    assert agent._run_processes["agentrun1"].wait() == 0
    assert (tmp_path / "wandb" / "sweep-swp123" / "config-agentrun1.yaml").exists()  # where the agent put the params
    runs = find_offline_runs(run_dir)
    assert [p.name for p in runs] == ["run-agentrun1.wandb"]
    run = read_offline_run(runs[0], wait_for_exit=30)
    assert run["run"]["id"] == "agentrun1" and run["exit_code"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["strategy"] == "qlora" and summary["strategy/rank"] == 4
    config = run["config"]
    assert {k: config[k] for k in AGENT_PARAMS} == AGENT_PARAMS  # what the sweep controller reads back
    resolved = compose_cfg("strategy=qlora", "strategy.rank=4", "seed=1", "logger.mode=offline", *extra[:-1])
    expected = OmegaConf.to_container(resolved, resolve=True)
    expected.update(run_dir=str(run_dir))
    expected["logger"]["group"] = "single-runs"
    assert config["strategy"] == "qlora"  # the group choice, where the sweep controller reads it
    provenance = {k: v for k, v in config.items() if k.startswith("provenance/")}
    assert provenance == {k: v for k, v in summary.items() if k.startswith("provenance/")}  # what produced the run
    rest = {k: v for k, v in config.items() if not k.startswith("provenance/")}
    assert nest_dotted_keys(rest, drop={"strategy"}) == expected


class RecordingRun:
    """Stands in for a wandb Run: records finish() and config updates."""

    def __init__(self) -> None:
        self.exit_code: Any = None
        self.config = self
        self.updates: dict[str, Any] = {}

    def finish(self, exit_code: int) -> None:
        self.exit_code = exit_code

    def update(self, d: dict[str, Any], allow_val_change: bool = False) -> None:
        assert allow_val_change
        self.updates.update(d)


def test_agent_checks_parameters_refuses_a_multirun_and_outside_an_agent_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorabench.wandb_agent as wandb_agent

    cfg = compose_cfg("strategy=qlora", "strategy.rank=4", "seed=1")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    run = RecordingRun()
    assert adopt_agent_run(run, cfg) is run and run.updates == {} and run.exit_code is None
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"wandb_version": 1, **{k: {"value": v} for k, v in AGENT_PARAMS.items()}}))
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp123")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    assert adopt_agent_run(run, cfg) is run and run.exit_code is None
    assert run.updates == {k: v for k, v in agent_config(cfg, AGENT_PARAMS, {}).items() if k not in AGENT_PARAMS}
    assert run.updates["strategy.quant_type"] == "nf4" and "strategy" not in run.updates
    # the agent says strategy.rank=16, the command (no ${args_no_hyphens}) composed 4
    params.write_text(yaml.safe_dump({"strategy.rank": {"value": 16}}))
    with pytest.raises(ConfigError) as error:
        adopt_agent_run(run := RecordingRun(), cfg)
    assert str(error.value) == ("W&B sweep parameter strategy.rank=16 did not reach Hydra (the job composed 4): "
                                "the sweep's command must pass ${args_no_hyphens} to lorabench")
    assert run.exit_code == 1 and run.updates == {}  # the run is finished as failed, nothing written over
    params.write_text(yaml.safe_dump({"strategy.rnak": {"value": 4}}))
    with pytest.raises(ConfigError, match=r"^W&B sweep parameter 'strategy.rnak': not a lorabench config key"):
        adopt_agent_run(RecordingRun(), cfg)
    monkeypatch.setattr(wandb_agent, "is_multirun", lambda: True)
    with pytest.raises(ConfigError, match=r"^under `wandb agent` a sweep command runs one job"):
        adopt_agent_run(run := RecordingRun(), cfg)
    assert run.exit_code == 1 and run.updates == {}
