"""Module surgery shared by quantizers and adapters: find the targeted linears, swap a module.

Targets follow PEFT's rules (`all-linear` = every linear but the output head, or name suffixes).
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from lorabench.errors import ConfigError


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear and its subclasses (bnb Linear4bit), or any module flagged `is_quantized_linear`."""
    return isinstance(module, nn.Linear) or bool(getattr(module, "is_quantized_linear", False))


def output_embedding_names(model: nn.Module) -> set[str]:
    out = getattr(model, "get_output_embeddings", lambda: None)()
    return {n for n, m in model.named_modules() if out is not None and m is out} | {"lm_head"}


def find_target_linears(
    model: nn.Module, target_modules: Any, key: str = "strategy.target_modules"
) -> list[str]:
    """Names of the linear-like modules matched by `target_modules`.

    `all-linear` means every linear except the output head (as in PEFT); a list matches a
    module whose name equals an entry or ends with `.<entry>`. Matching nothing is an error.
    """
    skip = output_embedding_names(model)
    linears = [n for n, m in model.named_modules() if is_linear_like(m) and n not in skip]
    if isinstance(target_modules, str):
        targets: Iterable[str] = [target_modules]
    else:
        targets = list(target_modules)
    if list(targets) == ["all-linear"]:
        found = linears
    else:
        found = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        examples = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            f"{key}: {list(targets)} matched no linear layer; expected 'all-linear' or names among {examples}"
        )
    return found


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of `name` and the attribute to set on it."""
    if "." in name:
        parent_name, attr = name.rsplit(".", 1)
        return model.get_submodule(parent_name), attr
    return model, name


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at `name` for `new`."""
    parent, attr = get_submodule_parent(model, name)
    setattr(parent, attr, new)
