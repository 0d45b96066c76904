"""Quantize a backbone into the format a strategy declares (`Strategy.base_format()`).

Quantizers register by method name ("bnb4bit", "intn", ...) so that a new format is one
file in `backbone/` and the backbone code never branches on a strategy's name.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from lorabench.adapters.targets import find_target_linears
from lorabench.errors import ConfigError

Quantizer = Callable[..., None]
_QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(method: str) -> Callable[[Quantizer], Quantizer]:
    """Decorator: `fn(model, names, **options)` replaces the named linears in place."""

    def deco(fn: Quantizer) -> Quantizer:
        _QUANTIZERS[method] = fn
        return fn

    return deco


def quantize_backbone(model: nn.Module, fmt: Any) -> list[str]:
    """Replace the linears `fmt.target_modules` names with `fmt.method`'s quantized layers."""
    if fmt.method not in _QUANTIZERS:
        raise ConfigError(
            f"base format '{fmt.method}' has no quantizer; expected one of {sorted(_QUANTIZERS)}"
        )
    names = find_target_linears(model, fmt.target_modules)
    _QUANTIZERS[fmt.method](model, names, **fmt.options)
    return names
