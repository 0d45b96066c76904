"""ReLoRA's variant of the LoRA layer: fold the update into the base and start a new cycle.

The base may be a float linear of any dtype or a bitsandbytes 4-bit linear, merged by
dequantize → add → requantize (optionally from a 16-bit master copy, registered as a buffer
so memory accounting counts it). The layer keeps the scaled factors of every merged cycle,
so the rank of the accumulated update and the 4-bit drift can be measured exactly
(docs/relora.md).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lorabench.adapters.lora import LoRALinear, LoraVariant


def _bnb4bit() -> Any:
    """The 4-bit format module, imported only when a layer has a 4-bit base."""
    from lorabench.quant import bnb4bit

    return bnb4bit


def _to_cpu(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x.cpu() if isinstance(x, torch.Tensor) else x


class ReLoRAVariant(LoraVariant):
    """Plain LoRA forward; adds merge-and-restart and the bookkeeping that measures it."""

    def __init__(self, quantized: bool, master_copy: bool = False) -> None:
        self.quantized = quantized
        self.master_copy = master_copy
        # Scaled factors of every merged cycle: W_now − W_cycle0 = Σ_k U_k @ V_k (kept on CPU, tiny).
        self.merged_factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.initial_state: Optional[dict[str, Any]] = None  # 4-bit base at wrap time (quantized only)

    def attach(self, layer: LoRALinear) -> None:
        # nf4 + master_copy: a bf16 copy of the base (a buffer, so memory accounting counts it).
        layer.register_buffer("master", None, persistent=False)
        if self.quantized:
            # the starting 4-bit weight (on CPU, 0.5 B/param) to measure the accumulated requantization drift
            self.initial_state = _to_cpu(self.base_state(layer))
            if self.master_copy:
                layer.master = self.base_weight_float(layer).to(torch.bfloat16)

    # ---- base weight access --------------------------------------------------------------
    def base_weight_float(self, layer: LoRALinear) -> torch.Tensor:
        """The base weight as the model uses it, in fp32."""
        if self.quantized:
            return _bnb4bit().dequantized_weight(layer.base_layer, torch.float32)
        return layer.base_layer.weight.detach().float()

    def base_state(self, layer: LoRALinear) -> dict[str, Any]:
        """The base as plain tensors (4-bit: packed weight and quant_state), for checkpoints."""
        if self.quantized:
            return _bnb4bit().layer_state(layer.base_layer)
        return layer.base_layer.state_dict()

    def load_base_state(self, layer: LoRALinear, state: dict[str, Any]) -> None:
        """Restore `base_state` bit for bit."""
        if self.quantized:
            layer.base_layer = _bnb4bit().layer_from_state(state, layer.base_layer)
        else:
            layer.base_layer.load_state_dict(state)

    # ---- the restart ------------------------------------------------------------------------
    @torch.no_grad()
    def merge_and_restart(self, layer: LoRALinear, generator: torch.Generator) -> tuple[float, float]:
        """W += Δ = (α/r)·B@A, A re-drawn (kaiming), B = 0: the function is unchanged.

        Returns (‖realized change of the stored W − Δ‖_F, ‖Δ‖_F): the first is 0 for an fp32
        base, bf16 rounding for a bf16 one, and 4-bit rounding for nf4.
        """
        delta = self.delta_weight(layer)
        if self.quantized:
            before = self.base_weight_float(layer)
            if layer.master is not None:  # merge into the 16-bit copy, quantize from it
                layer.master.copy_((layer.master.float() + delta).to(layer.master.dtype))
                target = layer.master.float()
            else:  # dequantize, add, requantize
                target = before + delta
            layer.base_layer = _bnb4bit().requantize_weight(layer.base_layer, target)
            err = (self.base_weight_float(layer) - before - delta).norm().item()
        else:
            w = layer.base_layer.weight
            intended = w.float() + delta
            w.copy_(intended.to(w.dtype))
            err = (w.float() - intended).norm().item()
        self.merged_factors.append(
            (layer.lora_B.weight.detach().float().cpu().clone(),
             (layer.lora_A.weight.detach().float() * layer.scaling).cpu())
        )
        layer.reset_lora_parameters(generator)
        return err, delta.norm().item()

    # ---- what the restarts did -------------------------------------------------------------
    def requant_drift(self, layer: LoRALinear) -> tuple[float, float]:
        """(‖W_now − W_start − Σ merged Δ‖_F, ‖Σ merged Δ‖_F) for a 4-bit base, all dequantized.

        The error that rounding to the 4-bit grid at every merge has accumulated: it grows
        with the merges when merging by dequantize-add-requantize, and stays one quantization
        step away when requantizing from a master copy.
        """
        if not self.merged_factors or self.initial_state is None:
            return 0.0, 0.0
        bnb4 = _bnb4bit()
        start = bnb4.dequantized_weight(bnb4.layer_from_state(self.initial_state, layer.base_layer), torch.float32)
        now = self.base_weight_float(layer).cpu()
        u = torch.cat([u for u, _ in self.merged_factors], dim=1)
        v = torch.cat([v for _, v in self.merged_factors], dim=0)
        applied = u @ v
        return (now - start.cpu() - applied).norm().item(), applied.norm().item()

    def accumulated_update_rank(self, layer: LoRALinear) -> int:
        """Numerical rank (at fp32 precision) of Σ merged (α/r)·B_k@A_k + the current (α/r)·B@A.

        Computed from the factors: with U = [B_1 … B_K B] and V = [s·A_1; …; s·A_K; s·A],
        the singular values of U@V are those of R_u @ R_vᵀ (QR of U and Vᵀ), a small matrix.
        """
        us = [u for u, _ in self.merged_factors] + [layer.lora_B.weight.detach().float().cpu()]
        vs = [v for _, v in self.merged_factors] + [(layer.lora_A.weight.detach().float() * layer.scaling).cpu()]
        u = torch.cat(us, dim=1).double()
        v = torch.cat(vs, dim=0).double()
        _, ru = torch.linalg.qr(u)
        _, rv = torch.linalg.qr(v.T)
        s = torch.linalg.svdvals(ru @ rv.T)
        if s.numel() == 0 or s[0] == 0:
            return 0
        tol = s[0] * max(layer.out_features, layer.in_features) * torch.finfo(torch.float32).eps
        return int((s > tol).sum())


def relora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every LoRA layer with a ReLoRA variant, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and isinstance(m.variant, ReLoRAVariant)]

