"""Group-wise asymmetric INT-N weights (QA-LoRA's base format) and the `intn` quantizer.

`W[o, i] = s[l, o] · (q[o, i] − z[l, o])` with `l = i // g`: one scale and one zero point per
(group of g consecutive input features, output). Codes q ∈ [0, 2^bits − 1] are bit-packed
(8 codes in `bits` bytes), so the weight costs exactly bits/8 bytes per element. Zero points
are floats on purpose: QA-LoRA's merge moves them to fractional values (docs/qalora.md#merge-into-the-zero-points).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lorabench.quant import register_quantizer
from lorabench.quant.code_quantizers import CODE_QUANTIZERS
from lorabench.surgery import replace_module
from lorabench.errors import ConfigError
from lorabench.memory import LayerBytes, register_accounting

SUPPORTED_BITS = (2, 3, 4, 8)
CODES_PER_CHUNK = 8  # 8 codes of `bits` bits fill exactly `bits` bytes, for every supported width


# ---- bit packing ------------------------------------------------------------------------------
def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (out, in) along `in` into (out, ceil(in/8)·bits) bytes (zero-padded)."""
    out, n = q.shape
    pad = (-n) % CODES_PER_CHUNK
    q64 = torch.nn.functional.pad(q.to(torch.int64), (0, pad)).view(out, -1, CODES_PER_CHUNK)
    shifts = torch.arange(CODES_PER_CHUNK, dtype=torch.int64, device=q.device) * bits
    word = (q64 << shifts).sum(-1)  # (out, chunks): 8·bits ≤ 64 bits each
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=q.device) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(out, -1)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (out, in) uint8 codes."""
    out = packed.shape[0]
    b = packed.to(torch.int64).view(out, -1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(-1)
    shifts = torch.arange(CODES_PER_CHUNK, dtype=torch.int64, device=packed.device) * bits
    q = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(out, -1)[:, :in_features].to(torch.uint8)


# ---- the layer ----------------------------------------------------------------------------------
class IntNLinear(nn.Module):
    """A frozen linear whose weight is group-wise asymmetric INT-N: forward = dequantize + matmul.

    Hand-written because bitsandbytes has no affine group-wise INT-N format with zero points
    (its 4-bit types are absmax-scaled NF4/FP4 over blocks, its 8-bit one is row-wise absmax),
    and QA-LoRA's merge needs exactly those zero points. Buffers: `qweight` (packed codes,
    uint8), `scales` and `zeros` (L × out, fp32 so a merged fractional zero stays exact), and
    an optional float `bias`. Nothing here trains. There is deliberately no `.weight`: code
    that would write into it (a float LoRA merge) must fail loudly, not update a temporary.
    """

    is_quantized_linear = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        if group_size <= 0 or in_features % group_size:
            raise ConfigError(
                f"strategy.group_size: {group_size} does not divide in_features={in_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.compute_dtype = dtype  # dtype of the dequantized weight (the base model's dtype)
        n_groups = in_features // group_size
        packed_cols = math.ceil(in_features / CODES_PER_CHUNK) * bits
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, bits: int, group_size: int, quantizer: str = "rtn"
    ) -> "IntNLinear":
        """Quantize a float linear (nn.Linear or anything with `.weight` (out, in))."""
        quantize = CODE_QUANTIZERS.get(quantizer)
        w = linear.weight
        bias = getattr(linear, "bias", None)
        layer = cls(linear.in_features, linear.out_features, bits, group_size, bias is not None, w.dtype, w.device)
        q, s, z = quantize(w.detach(), bits, group_size)
        with torch.no_grad():
            layer.qweight.copy_(pack_codes(q, bits))
            layer.scales.copy_(s)
            layer.zeros.copy_(z)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    def codes(self) -> torch.Tensor:
        """The integer codes q, (out, in) uint8."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """W = s·(q − z), (out, in) in fp32."""
        q = self.codes().float().view(self.out_features, self.n_groups, self.group_size)
        w = (q - self.zeros.t().unsqueeze(-1)) * self.scales.t().unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def check_bits(bits: int, key: str = "strategy.bits") -> None:
    """One-line refusal for widths the packer and the paper do not cover."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{key}: INT-N supports bits in {list(SUPPORTED_BITS)}, got {bits}")


@register_quantizer("intn")
def quantize_intn(
    model: nn.Module,
    names: list[str],
    bits: int,
    group_size: int,
    quantizer: str = "rtn",
    **unused: object,
) -> None:
    """Replace each named linear by an IntNLinear; all inputs are checked before any layer changes."""
    if unused:
        raise ConfigError(f"intn quantizer: unknown options {sorted(unused)}")
    check_bits(bits)
    CODE_QUANTIZERS.get(quantizer)  # refuses an unknown name before any layer changes
    if group_size <= 0:
        raise ConfigError(f"strategy.group_size: must be a positive integer, got {group_size}")
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, IntNLinear):
            raise ConfigError(f"{name}: already INT-N quantized")
        if not hasattr(layer, "weight") or layer.weight.dim() != 2:
            raise ConfigError(f"{name}: INT-N quantization needs a float linear, got {type(layer).__name__}")
        if layer.in_features % group_size:
            raise ConfigError(
                f"strategy.group_size: {group_size} does not divide in_features={layer.in_features} of layer '{name}'"
            )
    for name in names:
        replace_module(model, name, IntNLinear.from_linear(model.get_submodule(name), bits, group_size, quantizer))


@register_accounting(IntNLinear)
def _intn_bytes(m: IntNLinear) -> LayerBytes:
    """Exact: packed codes (bits/8 per weight, padded to whole 8-code chunks) + fp32 scales and zeros + bias."""
    n = m.in_features * m.out_features
    code_bytes = m.out_features * math.ceil(m.in_features / CODES_PER_CHUNK) * m.bits
    const_bytes = 2 * m.n_groups * m.out_features * 4
    tensors = [m.qweight, m.scales, m.zeros]
    bias_bytes = 0
    logical = n
    if m.bias is not None:
        tensors.append(m.bias)
        bias_bytes = m.bias.numel() * m.bias.element_size()
        logical += m.bias.numel()
    return LayerBytes(logical, n, float(code_bytes + const_bytes + bias_bytes), tensors)
