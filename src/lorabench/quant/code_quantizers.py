"""How INT-N codes, scales and zero points are chosen for a float weight (QA-LoRA's base).

Round-to-nearest now; GPTQ or HQQ would register here (GPTQ also takes calibration data).
"""

from __future__ import annotations

from typing import Callable

import torch

from lorabench.registry import Registry

# fn(weight (out, in), bits, group_size) -> (q (out, in) uint8, scales (L, out), zeros (L, out))
CodeQuantizer = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
CODE_QUANTIZERS: Registry[CodeQuantizer] = Registry("INT-N quantizer", "strategy.quantizer")


def register_code_quantizer(name: str) -> Callable[[CodeQuantizer], CodeQuantizer]:
    """Decorator: make `fn` selectable as `strategy.quantizer=<name>`."""
    return CODE_QUANTIZERS.register(name)


@register_code_quantizer("rtn")
def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest from each group's min/max: s = (max−min)/(2^b−1), z = round(−min/s).

    Every element then lies within s/2 of its reconstruction (the integer zero shifts the grid
    by at most s/2, and the clamp never moves an in-range value further than that). A constant
    group gets s = |c| (or 1 for zeros) so that it is reconstructed exactly.
    """
    out, n = weight.shape
    maxq = (1 << bits) - 1
    w = weight.detach().float().reshape(out, n // group_size, group_size)
    wmin = w.amin(-1)
    wmax = w.amax(-1)
    scale = (wmax - wmin) / maxq
    flat = scale == 0
    scale = torch.where(flat, torch.where(wmin != 0, wmin.abs(), torch.ones_like(wmin)), scale)
    zero = torch.round(-wmin / scale)
    q = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    return q.reshape(out, n).to(torch.uint8), scale.t().contiguous(), zero.t().contiguous()
