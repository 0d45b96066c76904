"""QA-LoRA's variant of the LoRA layer: the adapter sees the input pooled over each
quantization group, so its update folds into the INT-N base's zero points.

`y = Wq x + (α/r) · B(A(pool(dropout(x))))`, pool = mean (official code) or sum (the paper's
Algorithm 1) over each group of g consecutive input features, g = the quantization group.
The update then depends on x only through group aggregates, so its weight change is constant
inside each (group, output) cell (docs/qalora.md#merge-into-the-zero-points):
mean: `z' = z − (α/r)(BA)ᵀ / (g·s)`; sum: `z' = z − (α/r)(BA)ᵀ / s`. q and s stay bitwise.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lorabench.adapters.lora import LoRALinear, LoraVariant, inject_lora, lora_layers
from lorabench.errors import ConfigError
from lorabench.quant.intn import IntNLinear

POOLINGS = ("mean", "sum")


class QALoRAVariant(LoraVariant):
    """Group pooling before A (A is r × in/g, xavier-uniform as the official code); merge into zeros."""

    def __init__(self, base_layer: nn.Module, pooling: str = "sum", group_size: Optional[int] = None,
                 name: str = "layer") -> None:
        check_pooling_target(base_layer, group_size, name)
        if pooling not in POOLINGS:
            raise ConfigError(f"strategy.pooling: expected one of {list(POOLINGS)}, got '{pooling}'")
        self.pooling = pooling
        self.group_size = base_layer.group_size
        self.n_groups = base_layer.in_features // self.group_size

    def a_in_features(self, base_layer: nn.Module) -> int:
        return self.n_groups

    def init_lora_a(self, weight: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        nn.init.xavier_uniform_(weight, generator=generator)

    def adapter_input(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """(..., in) → (..., in/g): mean or sum over each contiguous group of g features."""
        grouped = x.reshape(*x.shape[:-1], self.n_groups, self.group_size)
        return grouped.mean(-1) if self.pooling == "mean" else grouped.sum(-1)

    def pooled_delta(self, layer: LoRALinear) -> torch.Tensor:
        """(α/r)·B@A, (out, in/g) in fp32, divided by g for mean pooling: the weight change of
        every input inside one group."""
        d = (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling
        return d / self.group_size if self.pooling == "mean" else d

    def delta_weight(self, layer: LoRALinear) -> torch.Tensor:
        """The equivalent dense (out, in) change: each group's entry spread over its g inputs."""
        return self.pooled_delta(layer).repeat_interleave(self.group_size, dim=1)

    def merge(self, layer: LoRALinear) -> None:
        """s·(q − z') = s·(q − z) + ΔW gives z' = z − ΔW/s; q and s are not touched."""
        base = layer.base_layer
        base.zeros.copy_(base.zeros - self.pooled_delta(layer).t() / base.scales)

    def unmerge(self, layer: LoRALinear) -> None:
        base = layer.base_layer
        base.zeros.copy_(base.zeros + self.pooled_delta(layer).t() / base.scales)


def check_pooling_target(layer: nn.Module, group_size: Optional[int], name: str) -> None:
    """Refuse what would make the zero-point merge inexact: a non-INT-N base, a pooling group
    different from the quantization group, or a group that does not tile in_features."""
    if not isinstance(layer, IntNLinear):
        raise ConfigError(
            f"{name}: QA-LoRA needs an INT-N base layer (base format 'intn'), got {type(layer).__name__}"
        )
    g = layer.group_size if group_size is None else group_size
    if g <= 0 or layer.in_features % g:
        raise ConfigError(
            f"strategy.group_size: pooling group {g} does not divide in_features={layer.in_features} of layer '{name}'"
        )
    if g != layer.group_size:
        raise ConfigError(
            f"strategy.group_size: pooling group {g} differs from the quantization group {layer.group_size} "
            f"of layer '{name}'; the merge into zero points is exact only when they are equal"
        )


def inject_qalora(
    model: nn.Module,
    target_modules: Any,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    pooling: str = "sum",
    group_size: Optional[int] = None,
) -> list[str]:
    """Freeze `model` and wrap every targeted IntNLinear in a pooled LoRA layer; return the names.

    All targets are checked before any module changes, so a refusal leaves the model intact.
    """
    return inject_lora(
        model, target_modules, rank, alpha, dropout,
        variant=lambda name, base: QALoRAVariant(base, pooling, group_size, name),
    )


def qalora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every pooled (QA-LoRA) layer in the model, in module order."""
    return [(n, m) for n, m in lora_layers(model) if isinstance(m.variant, QALoRAVariant)]
