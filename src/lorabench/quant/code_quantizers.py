"""How INT-N codes, scales and zero points are chosen for a float weight (QA-LoRA's base).

Round-to-nearest (`rtn`, GPTQ's `find_params` grid) and HQQ (`hqq`, the `hqq` library's
calibration-free optimizer of the zero points). GPTQ (which takes calibration data) would
register here too. Every quantizer returns the stored types: uint8 codes, fp16 scales and zero
points either as integers in [0, 2^N − 1] (uint8: GPTQ's layout) or fractional (fp16: HQQ's),
which the INT-N layer holds as packed integers or fp16 (docs/qalora.md#storage).
"""

from __future__ import annotations

from typing import Callable

import torch

from lorabench.errors import ConfigError
from lorabench.registry import Registry

# fn(weight (out, in), bits, group_size) -> (q (out, in) uint8, scales (L, out) fp16, zeros (L, out) uint8 | fp16)
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


@register_code_quantizer("hqq")
def hqq_quantize(
    weight: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ (Badri & Shaji, 2023) through the `hqq` library: min/max scale per group of g inputs
    (`axis=1`), then a half-quadratic solver moves each group's zero point to minimise an
    l_p (p = 0.7) norm of the error; no calibration data. Its zero points are fractional, so
    they come back as fp16 and the layer holds them so (`N + 32/g` bits per weight instead of
    `N + 16/g + N/g`). Scales are rounded to fp16 as stored, codes kept as hqq chose them.
    """
    from hqq.core.quantize import Quantizer

    out, n = weight.shape
    w = weight.detach().float()
    q, meta = Quantizer.quantize(
        w, nbits=bits, channel_wise=True, group_size=group_size, optimize=True, round_zero=False,
        axis=1, bitpack=False, compute_dtype=torch.float32, device=str(w.device),
    )
    groups = n // group_size
    scale = meta["scale"].reshape(out, groups).float()
    zero = meta["zero"].reshape(out, groups).float()
    if not bool(torch.isfinite(scale.half()).all() & torch.isfinite(zero.half()).all()):
        raise ConfigError(f"strategy.quantizer: hqq's scales or zero points exceed fp16 at {bits} bits")
    codes = q.reshape(out, n).round().clamp(0, (1 << bits) - 1).to(torch.uint8)
    return codes, scale.t().half().contiguous(), zero.t().half().contiguous()
