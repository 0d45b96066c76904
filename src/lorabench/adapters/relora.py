"""ReLoRA's variant of the LoRA layer: fold the update into the base and start a new cycle.

The base may be a float linear of any dtype or a bitsandbytes 4-bit linear, merged by
dequantize → add → requantize, or (the default over 4 bits) from a float master copy that
receives every merge, so rounding to the 4-bit grid does not accumulate. Everything the
layer keeps beyond LoRA is a non-persistent buffer, so memory accounting counts it in both
expected and measured bytes: the master copy, and with `keep_factors` the scaled factors of
every merged cycle (the rank of the accumulated update and the 4-bit drift are measured
from them) plus the starting 4-bit weight (docs/relora.md).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lorabench.adapters.lora import LoRALinear, LoraVariant

FACTOR_BUFFERS = ("relora_u", "relora_v")  # stacked merged factors: U = [B_1 … B_K] (out × K·r), V = [s·A_1; …; s·A_K]
INITIAL_PREFIX = "relora_initial__"  # buffers holding the starting 4-bit weight (keep_factors over nf4 only)


def _bnb4bit() -> Any:
    """The 4-bit format module, imported only when a layer has a 4-bit base."""
    from lorabench.quant import bnb4bit

    return bnb4bit


def _flatten(state: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """{"data": t, "stats": {"absmax": t}} -> {"data": t, "stats/absmax": t} (None values dropped)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif v is not None:
            out[prefix + k] = v
    return out


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of `_flatten` for `bnb4bit.layer_state` dicts (the bias key comes back as None if absent)."""
    out: dict[str, Any] = {"bias": None}
    for key, t in flat.items():
        node = out
        *parents, last = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = t
    return out


def _buffer_name(key: str) -> str:
    """A buffer name for a flattened key (buffer names may not contain '.')."""
    return INITIAL_PREFIX + key.replace("/", "__slash__").replace(".", "__dot__")


def _key_of(name: str) -> str:
    return name[len(INITIAL_PREFIX):].replace("__dot__", ".").replace("__slash__", "/")


class ReLoRAVariant(LoraVariant):
    """Plain LoRA forward; adds merge-and-restart and what measures it."""

    def __init__(self, quantized: bool, master_dtype: Optional[torch.dtype] = None, keep_factors: bool = False) -> None:
        self.quantized = quantized
        self.master_dtype = master_dtype  # dtype of the master copy over a 4-bit base; None = no master
        self.keep_factors = keep_factors

    def attach(self, layer: LoRALinear) -> None:
        layer.register_buffer("master", None, persistent=False)
        for name in FACTOR_BUFFERS:
            layer.register_buffer(name, None, persistent=False)
        if self.quantized and self.master_dtype is not None:
            layer.master = self.base_weight_float(layer).to(self.master_dtype)
        if self.quantized and self.keep_factors:  # the starting 4-bit weight, for the drift measurement
            for key, t in _flatten(_bnb4bit().layer_state(layer.base_layer)).items():
                layer.register_buffer(_buffer_name(key), t, persistent=False)

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

    def initial_state(self, layer: LoRALinear) -> Optional[dict[str, Any]]:
        """The starting 4-bit base as `bnb4bit.layer_state` (keep_factors over nf4), else None."""
        flat = {_key_of(n): b for n, b in layer.named_buffers(recurse=False) if n.startswith(INITIAL_PREFIX)}
        return _unflatten(flat) if flat else None

    # ---- the merged factors (keep_factors) -------------------------------------------------
    def merged_factors(self, layer: LoRALinear) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(B_k, s·A_k)] of every merged cycle, fp32 on CPU; empty unless keep_factors."""
        u, v = layer.relora_u, layer.relora_v
        if u is None:
            return []
        r = layer.lora_A.weight.shape[0]
        return [(u[:, i:i + r], v[i:i + r]) for i in range(0, u.shape[1], r)]

    def set_merged_factors(self, layer: LoRALinear, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace the kept factors (from `merged_factors` of a saved run)."""
        if not factors:
            layer.relora_u = layer.relora_v = None
            return
        layer.relora_u = torch.cat([u.float().cpu() for u, _ in factors], dim=1).contiguous()
        layer.relora_v = torch.cat([v.float().cpu() for _, v in factors], dim=0).contiguous()

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
            if layer.master is not None:  # merge into the float copy, quantize from it
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
        if self.keep_factors:  # 4 bytes per adapter parameter per merge, counted as buffers
            u = layer.lora_B.weight.detach().float().cpu().clone()  # B is zeroed in place below
            v = (layer.lora_A.weight.detach().float() * layer.scaling).cpu()
            if layer.relora_u is not None:
                u, v = torch.cat([layer.relora_u, u], dim=1), torch.cat([layer.relora_v, v], dim=0)
            layer.relora_u, layer.relora_v = u.contiguous(), v.contiguous()
        layer.reset_lora_parameters(generator)
        return err, delta.norm().item()

    # ---- what the restarts did (keep_factors) ------------------------------------------------
    def requant_drift(self, layer: LoRALinear) -> tuple[float, float]:
        """(‖W_now − W_start − Σ merged Δ‖_F, ‖Σ merged Δ‖_F) for a 4-bit base, all dequantized.

        The error that rounding to the 4-bit grid has accumulated over the merges: it grows
        with the merges when merging by dequantize-add-requantize, and stays about one
        quantization step when requantizing from a float master copy. Needs keep_factors.
        """
        initial = self.initial_state(layer)
        factors = self.merged_factors(layer)
        if not factors or initial is None:
            return 0.0, 0.0
        bnb4 = _bnb4bit()
        start = bnb4.dequantized_weight(bnb4.layer_from_state(initial, layer.base_layer), torch.float32).cpu()
        now = self.base_weight_float(layer).cpu()
        applied = layer.relora_u.double() @ layer.relora_v.double()
        return (now.double() - start.double() - applied).norm().item(), applied.norm().item()

    def accumulated_update_rank(self, layer: LoRALinear) -> int:
        """Numerical rank (at fp32 precision) of Σ merged (α/r)·B_k@A_k + the current (α/r)·B@A.

        Computed from the factors: with U = [B_1 … B_K B] and V = [s·A_1; …; s·A_K; s·A],
        the singular values of U@V are those of R_u @ R_vᵀ (QR of U and Vᵀ), a small matrix.
        Without keep_factors only the current cycle is known.
        """
        us = [u for u, _ in self.merged_factors(layer)] + [layer.lora_B.weight.detach().float().cpu()]
        vs = [v for _, v in self.merged_factors(layer)] + [(layer.lora_A.weight.detach().float() * layer.scaling).cpu()]
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
