"""The one LoRA layer: `y = base(x) + s·B(A(drop(x)))`, with variants for the methods that
change what A sees or how the update merges (QA-LoRA's group pooling, ReLoRA's restarts).

Plain LoRA behaves as HF PEFT's LoRA layer (docs/lora.md): A ~ kaiming_uniform(a=√5),
B = 0, s = α/r (α/√r with rsLoRA), dropout on the adapter input only, adapters in fp32
whatever the base dtype, modules created in PEFT's order so a seed gives PEFT's init.
A variant (as PEFT's `LoraVariant`) owns only what differs; the forward is written once.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from lorabench.surgery import find_target_linears, replace_module
from lorabench.utils import module_device


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """α/r, or α/√r for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoraVariant:
    """Plain LoRA. Subclasses override what their method changes; one instance per layer,
    so a variant may keep per-layer state (registered on the layer when it must be counted)."""

    def attach(self, layer: "LoRALinear") -> None:
        """Called once the layer's A and B exist (e.g. to register buffers on it)."""

    def a_in_features(self, base_layer: nn.Module) -> int:
        """Width of A's input: the base's in_features (QA-LoRA: the number of groups)."""
        return base_layer.in_features

    def init_lora_a(self, weight: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """kaiming_uniform(a=√5), bound 1/√fan_in: PEFT's default."""
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)

    def adapter_input(self, layer: "LoRALinear", x: torch.Tensor) -> torch.Tensor:
        """What A multiplies, from the (dropped-out) layer input."""
        return x

    def dropped_input(self, layer: "LoRALinear", x: torch.Tensor) -> torch.Tensor:
        """A's input in training: dropout on x, then `adapter_input` (PEFT's order)."""
        return self.adapter_input(layer, layer.lora_dropout(x))

    def delta_weight(self, layer: "LoRALinear") -> torch.Tensor:
        """The update as a dense (out, in) fp32 weight change: (α/r)·B@A."""
        return (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling

    def merge(self, layer: "LoRALinear") -> None:
        """Fold the update into the base: W += ΔW (the base must hold a plain float weight)."""
        w = layer.base_layer.weight
        w.copy_((w.float() + self.delta_weight(layer)).to(w.dtype))

    def unmerge(self, layer: "LoRALinear") -> None:
        """Undo `merge`: W -= ΔW."""
        w = layer.base_layer.weight
        w.copy_((w.float() - self.delta_weight(layer)).to(w.dtype))


class LoRALinear(nn.Module):
    """A frozen linear-like `base_layer` plus a trainable low-rank update."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        variant: Optional[LoraVariant] = None,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.variant = variant if variant is not None else LoraVariant()
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.rank = rank
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = module_device(base_layer)
        a_in = self.variant.a_in_features(base_layer)
        # Created as nn.Linear (consuming the RNG as PEFT does), then re-initialised.
        self.lora_A = nn.Linear(a_in, rank, bias=False, dtype=adapter_dtype, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, dtype=adapter_dtype, device=device)
        self.merged = False
        self.reset_lora_parameters()
        self.variant.attach(self)

    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """A from the variant's init, B = 0: the update starts at zero (the wrap is the identity)."""
        self.variant.init_lora_a(self.lora_A.weight, generator)
        nn.init.zeros_(self.lora_B.weight)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output in x's dtype (a float base of another dtype gets a cast input)."""
        w = getattr(self.base_layer, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype != x.dtype:
            return self.base_layer(x.to(w.dtype)).to(x.dtype)
        return self.base_layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged:
            return result
        h = self.variant.dropped_input(self, x.to(self.lora_A.weight.dtype))
        # Scale the r-wide hidden, not the out-wide update: s·B(Ah) = B(s·Ah) saves one pass
        # over the largest adapter tensor forward and backward (bit-identical when s = α/r
        # is a power of two, as with the defaults; otherwise equal to float rounding).
        update = self.lora_B(self.lora_A(h) * self.scaling)
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (out, in) fp32 weight change."""
        return self.variant.delta_weight(self)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base in place (the forward then skips the adapter)."""
        if not self.merged:
            self.variant.merge(self)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`."""
        if self.merged:
            self.variant.unmerge(self)
            self.merged = False


VariantFactory = Callable[[str, nn.Module], Optional[LoraVariant]]  # (layer name, base layer) -> variant


def inject_lora(
    model: nn.Module,
    target_modules: Any,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    variant: Optional[VariantFactory] = None,
) -> list[str]:
    """Freeze `model` and replace every targeted linear by a LoRALinear; return the names.

    The variant factory runs for every layer before any module changes, so a refusal
    (e.g. a base QA-LoRA cannot pool over) leaves the model intact.
    """
    names = find_target_linears(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    variants = {n: (variant(n, model.get_submodule(n)) if variant else None) for n in names}
    for name in names:
        base = model.get_submodule(name)
        replace_module(model, name, LoRALinear(base, rank, alpha, dropout, rslora, variants[name]))
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
