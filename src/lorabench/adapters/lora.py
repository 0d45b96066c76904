"""The LoRA layer, shared by `lora`, `qlora`, `relora` and any strategy that needs y = Wx + s·BAx.

It behaves as HF PEFT's LoRA layer (the reference users trust): A ~ kaiming_uniform(a=√5),
B = 0, scale α/r (α/√r with rsLoRA), dropout on the adapter input only, adapters in fp32
whatever the base dtype, and modules created in PEFT's order so a seed gives PEFT's init.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorabench.adapters.targets import find_target_linears, replace_module
from lorabench.utils import module_device


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """α/r, or α/√r for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """A frozen linear-like `base_layer` plus a trainable low-rank update."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.rank = rank
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = module_device(base_layer)
        # Created as nn.Linear (consuming the RNG as PEFT does), then re-initialised.
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, dtype=adapter_dtype, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, dtype=adapter_dtype, device=device)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming_uniform(a=√5) (bound 1/√in_features), B = 0: the wrap starts as the identity."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a_in = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        # Scale the r-wide hidden, not the out-wide update: s·B(Ah) = B(s·Ah) saves one pass
        # over the largest adapter tensor forward and backward (bit-identical when s = α/r
        # is a power of two, as with the defaults; otherwise equal to float rounding).
        update = self.lora_B(self.lora_A(a_in) * self.scaling)
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B@A in fp32, shaped like the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W += (α/r)·B@A in place (the base must hold a plain float weight)."""
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W -= (α/r)·B@A."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False


def inject_lora(
    model: nn.Module,
    target_modules: Any,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Freeze `model` and replace every targeted linear by a LoRALinear; return the names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = find_target_linears(model, target_modules)
    for name in names:
        base = model.get_submodule(name)
        replace_module(model, name, LoRALinear(base, rank, alpha, dropout, rslora))
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base and put the plain base back (in place)."""
    for name, layer in lora_layers(model):
        layer.merge()
        replace_module(model, name, layer.base_layer)
    return model
