"""The structure the folder names promise: imports run one way (foundations → backbone/quant →
adapters → strategies → training → entry points), no module imports a private name of
another, and no source file grows past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorabench"

# A module may import lorabench modules of its own layer or below, never above.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("errors", "utils", "registry", "surgery", "memory", "config", "data", "wandb_offline", "wandb_agent", "tracking")),
    (1, ("quant", "backbone", "evaluate", "lm_eval_bridge", "param_count", "provenance", "training.schedules", "training.optimizer")),
    (2, ("adapters",)),
    (3, ("strategies",)),
    (4, ("training",)),
    (5, ("checks", "argv_checks", "cli", "eval_cli", "pretrain_cli", "__main__", "__init__")),
    (6, ("analysis",)),  # reads what runs wrote (run dirs, W&B); never trains, so nothing imports it
]


def layer_of(module: str) -> int:
    """The layer of a dotted module name relative to the package (longest matching prefix)."""
    best = (-1, -1)
    for layer, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), layer)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def lorabench_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module relative to the package, names imported from it) for every lorabench import."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorabench"):
            base = node.module.removeprefix("lorabench").lstrip(".")
            names = [a.name for a in node.names]
            if not base:  # `from lorabench import memory`: the names are modules
                found += [(n, []) for n in names]
            else:
                found.append((base, names))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("lorabench").lstrip("."), []) for a in node.names if a.name.startswith("lorabench.")]
    return found


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_imports_run_one_way_and_stay_public(module: str, path: Path) -> None:
    own = layer_of(module)
    for target, names in lorabench_imports(path):
        if not target:
            continue
        assert layer_of(target) <= own, f"{module} (layer {own}) imports {target} (layer {layer_of(target)})"
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{module} imports private names {private} from {target}"


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_no_source_file_over_400_lines(module: str, path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 420, f"{module} has grown past ~400 lines: split it by concept"
