"""QA-LoRA's group-pooled adapter over an INT-N linear, and its merge into the zero points.

`y = Wq x + (α/r) · B(A(pool(dropout(x))))`, pool = mean (official code) or sum (the paper's
Algorithm 1) over each group of g consecutive input features, g = the quantization group.
Because the update then depends on x only through group aggregates, its weight change is
constant inside each (group, output) cell and folds into the zero point (DESIGN.md §3):
mean: `z' = z − (α/r)(BA)ᵀ / (g·s)`; sum: `z' = z − (α/r)(BA)ᵀ / s`. q and s stay bitwise.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lorabench.adapters.targets import find_target_linears, replace_module
from lorabench.backbone.intn import IntNLinear
from lorabench.errors import ConfigError

POOLINGS = ("mean", "sum")


class QALoRALinear(nn.Module):
    """A frozen IntNLinear `base_layer` plus a trainable pooled low-rank update (fp32)."""

    def __init__(
        self,
        base_layer: IntNLinear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        pooling: str = "sum",
        group_size: Optional[int] = None,
        name: str = "layer",
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_pooling_target(base_layer, group_size, name)
        if pooling not in POOLINGS:
            raise ConfigError(f"strategy.pooling: expected one of {list(POOLINGS)}, got '{pooling}'")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.group_size = base_layer.group_size
        self.n_groups = self.in_features // self.group_size
        self.rank = rank
        self.scaling = alpha / rank
        self.pooling = pooling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.qweight.device
        self.lora_A = nn.Linear(self.n_groups, rank, bias=False, dtype=adapter_dtype, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, dtype=adapter_dtype, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A xavier-uniform (as the official code), B = 0: the wrapped layer starts as the base."""
        nn.init.xavier_uniform_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) → (..., in/g): mean or sum over each contiguous group of g features."""
        grouped = x.reshape(*x.shape[:-1], self.n_groups, self.group_size)
        return grouped.mean(-1) if self.pooling == "mean" else grouped.sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a_in = self.pool(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        update = self.lora_B(self.lora_A(a_in)) * self.scaling
        return result + update.to(result.dtype)

    def pooled_delta(self) -> torch.Tensor:
        """(α/r)·B@A, (out, in/g) in fp32: the update per (output, group) of pooled input."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The equivalent dense weight change (out, in): each group's entry spread over its g inputs."""
        d = self.pooled_delta()
        if self.pooling == "mean":
            d = d / self.group_size
        return d.repeat_interleave(self.group_size, dim=1)

    @torch.no_grad()
    def merge_into_zeros(self) -> IntNLinear:
        """Fold the update into the base's zero points (in place) and return the base layer.

        ΔW[o, i] = d[o, l] (sum) or d[o, l]/g (mean) for every i in group l, and
        s·(q − z') = s·(q − z) + ΔW gives z' = z − ΔW/s. q and s are not touched.
        """
        base = self.base_layer
        d = self.pooled_delta().t()  # (L, out), the zeros' layout
        if self.pooling == "mean":
            d = d / self.group_size
        base.zeros.copy_(base.zeros - d / base.scales)
        return base


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
    """Freeze `model` and wrap every targeted IntNLinear in a QALoRALinear; return the names.

    All targets are checked before any module changes, so a refusal leaves the model intact.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = find_target_linears(model, target_modules)
    for name in names:
        check_pooling_target(model.get_submodule(name), group_size, name)
    for name in names:
        base = model.get_submodule(name)
        replace_module(model, name, QALoRALinear(base, rank, alpha, dropout, pooling, group_size, name))
    return names


def qalora_layers(model: nn.Module) -> list[tuple[str, QALoRALinear]]:
    """Every QALoRALinear in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QALoRALinear)]


def merge_qalora_and_unload(model: nn.Module) -> nn.Module:
    """Merge every QA-LoRA layer into its base zeros and put the IntNLinear back (in place)."""
    for name, layer in qalora_layers(model):
        replace_module(model, name, layer.merge_into_zeros())
    return model
