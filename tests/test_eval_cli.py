"""`lorabench-eval`: a finished run scored again from its run dir reproduces its summary exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorabench.eval_cli import main
from tests.helpers import REPO, TINY

EVAL_KEYS = ("loss", "accuracy", "token_accuracy", "perplexity")


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "LORABENCH_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA run (merge=16bit, so it has a merged score too) trained through the CLI."""
    root = tmp_path_factory.mktemp("eval")
    cmd = [sys.executable, "-m", "lorabench", *TINY, "strategy.merge=16bit", "extras.print_config=false",
           f"hydra.run.dir={root / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(root / "cache"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def lorabench_eval(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lorabench.eval_cli", str(run_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(run_dir.parent / "cache"), timeout=300)


@pytest.mark.parametrize("merged", [False, True])
def test_eval_reproduces_the_runs_summary_exactly(run_dir: Path, merged: bool) -> None:
    proc = lorabench_eval(run_dir, *(["--merged"] if merged else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    suffix = "_merged" if merged else ""
    expected = {f"eval/{k}{suffix}": summary[f"eval/{k}{suffix}"] for k in EVAL_KEYS}
    printed = json.loads(proc.stdout)
    assert printed == expected  # bit-exact: same weights, same data, same evaluate()
    written = json.loads((run_dir / "eval.json").read_text())
    assert {k: written[k] for k in expected} == expected


def test_merged_eval_of_a_run_without_merge_is_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = copy / ".hydra/config.yaml"
    cfg.write_text(cfg.read_text().replace("merge: 16bit", "merge: none"))
    assert main([str(copy), "--merged"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lorabench-eval: error: --merged: strategy 'lora' has no merged model for this run (strategy.merge=none)"]


@pytest.mark.parametrize(
    "remove,expected",
    [
        ("<dir>", "run_dir: {d} is not a directory"),
        (".hydra/config.yaml", "run_dir: {d}/.hydra/config.yaml does not exist (not a run dir written by lorabench)"),
        ("final_state.pt", "run_dir: {d}/final_state.pt does not exist (the run did not complete)"),
    ],
)
def test_bad_run_dir_is_one_line_and_exit_2(run_dir: Path, tmp_path: Path, capsys, remove: str, expected: str) -> None:
    copy = tmp_path / "run"
    if remove != "<dir>":
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval.json"))
        (copy / remove).unlink()
    assert main([str(copy)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"lorabench-eval: error: {expected.format(d=copy)}"]
    assert captured.out == "" and not (copy / "eval.json").exists()


def test_a_config_that_is_not_lorabench_is_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / ".hydra/config.yaml").write_text("trainer:\n  max_stpes: 3\n")
    assert main([str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lorabench-eval: error: {copy}/.hydra/config.yaml: not a lorabench config:")
    assert "max_stpes" in err[0]
