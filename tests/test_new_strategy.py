"""Adding a strategy is one file plus one YAML: proven on a temporary copy of the package and
conf tree, run end to end through the CLI with no other change; and the bad inputs of that
workflow (a name collision, a YAML key the dataclass lacks, a wrap that raises) are one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CONF, REPO, TINY

LORA_FA = '''"""LoRA-FA: A stays at its random init, only B trains (half the adapter's optimizer state)."""

from dataclasses import dataclass

from torch import nn

from lorabench.adapters.lora import lora_layers
from lorabench.strategies.lora import LoRA, LoRAConfig
from lorabench.strategies.registry import register


@dataclass
class LoRAFAConfig(LoRAConfig):
    name: str = "lora_fa"  # registry name


@register
class LoRAFA(LoRA):
    """Frozen A, trainable B."""

    name = "lora_fa"
    config_class = LoRAFAConfig
    label_keys = {"rank": "r"}

    def wrap(self, model: nn.Module) -> nn.Module:
        super().wrap(model)
        for _, layer in lora_layers(model):
            layer.lora_A.weight.requires_grad_(False)
        return model
'''

LORA_FA_YAML = """# LoRA-FA: only B trains.
defaults:
  - lora_fa_schema  # the dataclass: every key and its default
  - _self_
rank: 4  # a deviation from the dataclass default
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package and the conf tree, nothing else."""
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(REPO / "src" / "lorabench", root / "src" / "lorabench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(CONF, root / "conf")
    return root


def lorabench(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "LORABENCH_CONF": str(root / "conf"), "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "lorabench", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_one_file_and_one_yaml_run_end_to_end(tree: Path) -> None:
    (tree / "src/lorabench/strategies/lora_fa.py").write_text(LORA_FA)
    (tree / "conf/strategy/lora_fa.yaml").write_text(LORA_FA_YAML)
    run_dir = tree / "run"
    proc = lorabench(tree, "strategy=lora_fa", *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["strategy"] == "lora_fa"
    assert summary["strategy/rank"] == 4  # the YAML's deviation reached the run
    # only B trains: r·out per adapted linear (2 blocks of q,k,v,o: 64→64; gate,up: 64→128; down: 128→64)
    assert summary["params/trainable"] == 2 * 4 * (4 * 64 + 2 * 128 + 64)
    assert summary["eval/loss"] < summary["eval/loss_base"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()  # inherited PEFT-format adapter


def test_name_collision_is_one_line(tree: Path) -> None:
    (tree / "src/lorabench/strategies/lora_copy.py").write_text(LORA_FA.replace('"lora_fa"', '"lora"'))
    try:
        proc = lorabench(tree, "strategy=lora", *TINY, f"hydra.run.dir={tree / 'x'}")
    finally:
        (tree / "src/lorabench/strategies/lora_copy.py").unlink()
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "strategy 'lora' is defined twice" in err[0] and "lora_copy.py" in err[0], proc.stderr


def test_yaml_key_the_dataclass_lacks_is_one_line(tree: Path) -> None:
    (tree / "src/lorabench/strategies/lora_fa.py").write_text(LORA_FA)
    (tree / "conf/strategy/lora_fa.yaml").write_text(LORA_FA_YAML + "rnak: 4  # misspelled\n")
    proc = lorabench(tree, "strategy=lora_fa", *TINY, f"hydra.run.dir={tree / 'y'}")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "rnak" in err[0] and "LoRAFAConfig" in err[0], proc.stderr


def test_a_wrap_that_raises_is_one_line(tree: Path) -> None:
    broken = LORA_FA.replace("        super().wrap(model)\n", "        raise RuntimeError('no adapters for you')\n")
    (tree / "src/lorabench/strategies/lora_fa.py").write_text(broken)
    (tree / "conf/strategy/lora_fa.yaml").write_text(LORA_FA_YAML)
    run_dir = tree / "z"
    proc = lorabench(tree, "strategy=lora_fa", *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err == ["lorabench: error: strategy.name: strategy 'lora_fa' failed in wrap: RuntimeError: no adapters for you"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def third_party(name: str, cls: str) -> str:
    """The LoRA-FA file as another package's strategy `name`, class `cls`."""
    return LORA_FA.replace('"lora_fa"', f'"{name}"').replace("LoRAFA", cls)


def test_a_strategy_from_another_package_by_target_or_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`strategy._target_: pkg.module.Class` and the `lorabench.strategies` entry-point group
    both bring in a strategy that lives outside lorabench."""
    from lorabench.strategies import registry

    (tmp_path / "by_target.py").write_text(third_party("by_target", "ByTarget"))
    (tmp_path / "by_entry_point.py").write_text(third_party("by_entry_point", "ByEntryPoint"))
    dist = tmp_path / "thirdparty-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lorabench.strategies]\nby_entry_point = by_entry_point\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # this test's strategies leave the process's registry as they found it
    monkeypatch.setattr(registry.STRATEGIES, "_entries", dict(registry.STRATEGIES._entries))
    strategy = registry.build_strategy({"_target_": "by_target.ByTarget", "name": "by_target", "rank": 2})
    assert type(strategy).__name__ == "ByTarget" and strategy.cfg.rank == 2
    monkeypatch.setattr(registry, "_discovered", False)  # discover again, now with the entry point on the path
    assert "by_entry_point" in registry.available()
    with pytest.raises(Exception, match=r"strategy._target_: cannot import 'by_target.Nope'"):
        registry.build_strategy({"_target_": "by_target.Nope", "name": "x"})
