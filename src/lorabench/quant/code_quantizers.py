"""How INT-N codes, scales and zero points are chosen for a float weight (QA-LoRA's base).

Round-to-nearest now; GPTQ or HQQ would register here (GPTQ also takes calibration data).
Every quantizer returns the stored types: uint8 codes, fp16 scales, integer zero points in
[0, 2^N − 1] as uint8 (GPTQ's layout, docs/qalora.md#storage).
"""

from __future__ import annotations

from typing import Callable

import torch

from lorabench.errors import ConfigError
from lorabench.registry import Registry

# fn(weight (out, in), bits, group_size) -> (q (out, in) uint8, scales (L, out) fp16, zeros (L, out) uint8)
CodeQuantizer = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
CODE_QUANTIZERS: Registry[CodeQuantizer] = Registry("INT-N quantizer", "strategy.quantizer")
FP16_MAX = 65504.0  # largest finite fp16


def register_code_quantizer(name: str) -> Callable[[CodeQuantizer], CodeQuantizer]:
    """Decorator: make `fn` selectable as `strategy.quantizer=<name>`."""
    return CODE_QUANTIZERS.register(name)


def fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value ≥ x (x > 0): rounding a scale *up* keeps every weight of its
    group inside the 2^N-step grid, so the half-step error bound survives fp16 storage."""
    h = x.half()
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < x, up, h)


@register_code_quantizer("rtn")
def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest over each group's range widened to include 0, as GPTQ's `find_params`:
    `[lo, hi] = [min(x, 0), max(x, 0)]` (an all-zero group gets [−1, 1]),
    `s = (hi − lo) / (2^N − 1)` rounded up to fp16, `z = round(−lo / s)`,
    `q = clamp(round(w / s) + z, 0, 2^N − 1)`.

    Since lo ≤ 0 ≤ hi, 0 ≤ −lo/s ≤ 2^N − 1, so z is an integer inside [0, 2^N − 1] and fits
    an N-bit field. Every element lies within s/2 of its reconstruction s·(q − z) (the
    integer zero shifts the grid by at most s/2; the clamp never moves an in-range value
    further than that); an all-zero group is reconstructed exactly.
    """
    out, n = weight.shape
    maxq = (1 << bits) - 1
    w = weight.detach().float().reshape(out, n // group_size, group_size)
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    flat = (lo == 0) & (hi == 0)
    lo = torch.where(flat, -torch.ones_like(lo), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    scale = fp16_at_least((hi - lo) / maxq)
    if bool(torch.isinf(scale).any()):
        worst = float((hi - lo).max())
        raise ConfigError(
            f"strategy.quantizer: a weight group spans {worst:.4g}, beyond what fp16 scales hold "
            f"at {bits} bits (at most {FP16_MAX * maxq:.4g})"
        )
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, maxq)
    q = torch.clamp(torch.round(w / s.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    return q.reshape(out, n).to(torch.uint8), scale.t().contiguous(), zero.t().to(torch.uint8).contiguous()
