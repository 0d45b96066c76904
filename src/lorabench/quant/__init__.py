"""Quantized weight formats of the shared backbone, and the step that applies one.

A strategy declares the format it needs (`BaseFormat`); `quantize_backbone` replaces the
targeted linears by that format's layers. Formats register by method name ("bnb4bit",
"intn"), so a new format is one module here and nothing upstream branches on a name.
Each format module also registers its memory accounting and owns its state I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from lorabench.registry import Registry
from lorabench.surgery import find_target_linears

Quantizer = Callable[..., None]  # fn(model, names, **options): replace the named linears in place
QUANTIZERS: Registry[Quantizer] = Registry("base format", "base format")


@dataclass
class BaseFormat:
    """The weight format a strategy needs its backbone's linears in.

    `method` selects a registered quantizer ("bnb4bit", "intn"); `options` are its keyword
    arguments; `target_modules` says which linears are quantized ('all-linear' = every
    linear of the decoder, the output head excluded).
    """

    method: str
    target_modules: Any = "all-linear"
    options: dict[str, Any] = field(default_factory=dict)
    key: str = "strategy.quantize_modules"  # the config key that chose target_modules, for errors

    @property
    def bits_per_weight(self) -> float:
        """Nominal bits of the quantized weights, used by the seed memory formula."""
        return float(self.options.get("bits", 4))


def register_quantizer(method: str) -> Callable[[Quantizer], Quantizer]:
    """Decorator: make `fn(model, names, **options)` the quantizer of `BaseFormat(method)`."""
    return QUANTIZERS.register(method)


def quantizer_for(method: str) -> Quantizer:
    """The registered quantizer of `method` (the built-in formats imported first)."""
    _load_formats()
    return QUANTIZERS.get(method)


def quantize_backbone(model: nn.Module, fmt: BaseFormat) -> list[str]:
    """Replace the linears `fmt.target_modules` names with `fmt.method`'s quantized layers
    (`lorabench.quant.stream_load` calls the same quantizer while reading a checkpoint)."""
    quantizer = quantizer_for(fmt.method)
    names = find_target_linears(model, fmt.target_modules, key=fmt.key)
    quantizer(model, names, **fmt.options)
    return names


def _load_formats() -> None:
    """Import the built-in formats (each registers itself); bitsandbytes loads only when present."""
    from lorabench.quant import intn  # noqa: F401

    try:
        from lorabench.quant import bnb4bit  # noqa: F401
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency; keep INT-N usable without it
        pass


__all__ = ["BaseFormat", "QUANTIZERS", "quantize_backbone", "quantizer_for", "register_quantizer"]
