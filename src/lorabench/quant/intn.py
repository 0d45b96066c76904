"""Group-wise asymmetric INT-N weights (QA-LoRA's base format) and the `intn` quantizer.

`W[o, i] = s[l, o] · (q[o, i] − z[l, o])` with `l = i // g`: one scale and one zero point per
(group of g consecutive input features, output). Stored as GPTQ stores it: codes q ∈ [0, 2^N − 1]
bit-packed (8 codes in N bytes), fp16 scales, and integer zero points packed the same way
(N bits each): `N + 16/g + N/g` bits per weight. QA-LoRA's merge moves the zero points to
fractional values; the layer then holds them as floats: fp32 (`N + 48/g` bits per weight, the
merge exact up to float rounding) or fp16 as the official code (`N + 32/g`, rounds z')
(docs/qalora.md#storage).

The forward is a custom autograd function that saves only the packed state and dequantizes
again in backward, as bitsandbytes' and GPTQ's kernels do, so no dense float weight lives
from forward to backward (docs/memory.md#activation-bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lorabench.quant import register_quantizer
from lorabench.quant.code_quantizers import CODE_QUANTIZERS
from lorabench.surgery import replace_module
from lorabench.errors import ConfigError
from lorabench.memory import LayerBytes, register_accounting

SUPPORTED_BITS = (2, 3, 4, 8)
FLOAT_ZEROS = {"fp32": torch.float32, "fp16": torch.float16}  # layouts of fractional zero points
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
    """Inverse of `pack_codes`: (out, in) uint8 codes. Works in uint8 throughout (no widening):
    code k of a chunk is `byte >> offset`, or'ed with the next byte shifted left when it
    straddles two bytes (3 bits), then masked; uint8 shifts drop the overflow, the mask the rest."""
    out = packed.shape[0]
    b = packed.reshape(out, -1, bits)
    q = torch.empty(out, b.shape[1], CODES_PER_CHUNK, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for k in range(CODES_PER_CHUNK):
        byte, offset = divmod(k * bits, 8)
        code = b[..., byte] >> offset
        if offset + bits > 8:
            code |= b[..., byte + 1] << (8 - offset)
        q[..., k] = code & mask
    return q.reshape(out, -1)[:, :in_features]


# ---- dequantization and the matmul --------------------------------------------------------------
@dataclass(frozen=True)
class IntNShape:
    """What it takes to unpack a layer's state: widths and group size."""

    in_features: int  # input width (codes per row)
    out_features: int  # output width (rows; zero points per group)
    bits: int  # N
    group_size: int  # g


def zero_points(zeros: torch.Tensor, shape: IntNShape) -> torch.Tensor:
    """(L, out) fp32 zero points from any layout: packed N-bit integers (uint8), fp16 or fp32."""
    if zeros.dtype == torch.uint8:
        return unpack_codes(zeros, shape.bits, shape.out_features).float()
    return zeros.float()


DEQUANT_CHUNK = 1 << 17  # weights dequantized per step: the transient beyond W is one block's uint8 codes (+ its fp32 copy below fp32)


def dequantize_state(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, shape: IntNShape,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W = s·(q − z), (out, in) in `dtype`, from the packed state: computed in fp32 (then
    rounded once to `dtype`), a block of rows at a time written into W, so no full-size
    code or temporary tensor exists besides W itself (docs/qalora.md#base-group-wise-asymmetric-int-n).
    The in-place ops take the stored zeros (integer codes or floats) and fp16 scales as they
    are: they promote each element to fp32, exactly as an fp32 copy would."""
    out_f, in_f, g, bits = shape.out_features, shape.in_features, shape.group_size, shape.bits
    w = torch.empty(out_f, in_f, dtype=dtype, device=qweight.device)
    # a multiple of 8 rows, so a block's packed zero points (packed along out) are whole chunks
    rows = max(CODES_PER_CHUNK, DEQUANT_CHUNK // in_f // CODES_PER_CHUNK * CODES_PER_CHUNK)
    direct = dtype == torch.float32  # fp32: compute in place in W; else in an fp32 block, then round
    for r in range(0, out_f, rows):
        n = min(rows, out_f - r)
        if zeros.dtype == torch.uint8:
            z = unpack_codes(zeros[:, r // CODES_PER_CHUNK * bits:(r + n + 7) // CODES_PER_CHUNK * bits], bits, n)
        else:
            z = zeros[:, r:r + n]
        codes = unpack_codes(qweight[r:r + n], bits, in_f)
        block = w[r:r + n] if direct else torch.empty(codes.shape, dtype=torch.float32, device=w.device)
        block.copy_(codes)
        block.view(n, in_f // g, g).sub_(z.t().unsqueeze(-1)).mul_(scales[:, r:r + n].t().unsqueeze(-1))
        if not direct:
            w[r:r + n].copy_(block)
        del codes, block, z  # free this block before the next one is unpacked
    return w


class IntNMatmul(torch.autograd.Function):
    """`x @ Wᵀ` for a frozen INT-N weight. Saves the packed codes, scales and zeros (the
    layer's own buffers, no new memory) and dequantizes again in backward; computes no
    gradient for the weight, which never trains."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, shape: IntNShape) -> torch.Tensor:
        ctx.shape = shape
        ctx.save_for_backward(qweight, scales, zeros)
        return x @ dequantize_state(qweight, scales, zeros, shape, x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        qweight, scales, zeros = ctx.saved_tensors
        w = dequantize_state(qweight, scales, zeros, ctx.shape, grad_out.dtype)
        return grad_out @ w, None, None, None, None


# ---- the layer ----------------------------------------------------------------------------------
class IntNLinear(nn.Module):
    """A frozen linear whose weight is group-wise asymmetric INT-N.

    Hand-written because bitsandbytes has no affine group-wise INT-N format with zero points
    (its 4-bit types are absmax-scaled NF4/FP4 over blocks, its 8-bit one is row-wise absmax),
    and QA-LoRA's merge needs exactly those zero points. Buffers: `qweight` (packed codes,
    uint8, out × ⌈in/8⌉·N), `scales` (L × out, fp16), the zero points either as `qzeros`
    (packed N-bit integers, uint8, L × ⌈out/8⌉·N) or, once fractional (after a QA-LoRA merge),
    as `zeros` (L × out, fp32 or fp16) — exactly one of the two is set — and an optional float `bias`.
    Nothing here trains. There is deliberately no `.weight`: code that would write into it
    (a float LoRA merge) must fail loudly, not update a temporary.
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
        fractional_zeros: bool = False,
        zeros_dtype: torch.dtype = torch.float16,
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
        self.compute_dtype = dtype  # dtype of the bias (the base model's dtype); the matmul runs in x's
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("qzeros", None)
        self.register_buffer("zeros", None)
        if fractional_zeros:
            self.zeros = torch.zeros(n_groups, out_features, dtype=zeros_dtype, device=device)
        else:
            self.qzeros = torch.zeros(n_groups, packed_width(out_features, bits), dtype=torch.uint8, device=device)
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
            if z.dtype == torch.uint8:
                layer.set_integer_zeros(z)
            else:  # a quantizer with fractional zero points (hqq)
                layer.set_fractional_zeros(z)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def shape(self) -> IntNShape:
        return IntNShape(self.in_features, self.out_features, self.bits, self.group_size)

    @property
    def fractional_zeros(self) -> bool:
        """True once the zero points are held as floats (after a QA-LoRA merge, or hqq codes)."""
        return self.zeros is not None

    @property
    def zero_layout(self) -> str:
        """`packed` (N-bit integers), `fp16` or `fp32`: how the zero points are held."""
        if self.zeros is None:
            return "packed"
        return next(k for k, v in FLOAT_ZEROS.items() if v == self.zeros.dtype)

    def zero_tensor(self) -> torch.Tensor:
        """The stored zero points, whichever layout holds them."""
        return self.zeros if self.zeros is not None else self.qzeros

    def zero_points(self) -> torch.Tensor:
        """z as (L, out) fp32."""
        return zero_points(self.zero_tensor(), self.shape)

    @torch.no_grad()
    def set_integer_zeros(self, z: torch.Tensor) -> None:
        """Hold integer zero points in [0, 2^N − 1] packed N bits each (drops float zeros)."""
        zf = z.float()
        maxq = (1 << self.bits) - 1
        if zf.shape != (self.n_groups, self.out_features) or not bool(
            ((zf == zf.round()) & (zf >= 0) & (zf <= maxq)).all()
        ):
            raise ValueError(f"integer zero points must be ({self.n_groups}, {self.out_features}) integers in [0, {maxq}]")
        self.qzeros = pack_codes(zf.to(torch.uint8), self.bits).to(self.scales.device)
        self.zeros = None

    @torch.no_grad()
    def set_fractional_zeros(self, z: torch.Tensor, dtype: torch.dtype = torch.float16) -> None:
        """Hold (fractional) zero points as `dtype`, fp16 or fp32 (drops the packed integers)."""
        if dtype not in FLOAT_ZEROS.values():
            raise ValueError(f"fractional zero points are fp16 or fp32, got {dtype}")
        zf = z.to(device=self.scales.device, dtype=dtype)
        if zf.shape != (self.n_groups, self.out_features):
            raise ValueError(f"zero points must be ({self.n_groups}, {self.out_features}), got {tuple(zf.shape)}")
        if not bool(torch.isfinite(zf).all()):
            worst = float(z.abs().max())
            raise ConfigError(f"strategy.merge: a merged zero point reaches {worst:.4g}, beyond {dtype}'s range")
        self.zeros = zf
        self.qzeros = None

    def codes(self) -> torch.Tensor:
        """The integer codes q, (out, in) uint8."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """W = s·(q − z), (out, in) in fp32."""
        return dequantize_state(self.qweight, self.scales, self.zero_tensor(), self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = IntNMatmul.apply(x, self.qweight, self.scales, self.zero_tensor(), self.shape)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, "
            f"zeros={self.zero_layout}"
        )


def packed_width(n: int, bits: int) -> int:
    """Bytes per row of n packed N-bit values: ⌈n/8⌉ chunks of 8 codes, N bytes each."""
    return math.ceil(n / CODES_PER_CHUNK) * bits


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
def intn_layer_bytes(m: IntNLinear) -> LayerBytes:
    """Exact, from the format: packed codes (N/8 B per weight, rows padded to whole 8-code
    chunks), fp16 scales (2 B per group and output), zero points packed N bits each
    (rows of `out` padded the same way) or, once fractional, fp16 or fp32 (2 or 4 B each), and the bias."""
    n = m.in_features * m.out_features
    code_bytes = m.out_features * packed_width(m.in_features, m.bits)
    scale_bytes = 2 * m.n_groups * m.out_features
    if m.fractional_zeros:
        zero_bytes = m.zeros.element_size() * m.n_groups * m.out_features
    else:
        zero_bytes = m.n_groups * packed_width(m.out_features, m.bits)
    tensors = [m.qweight, m.scales, m.zero_tensor()]
    bias_bytes = 0
    logical = n
    if m.bias is not None:
        tensors.append(m.bias)
        bias_bytes = m.bias.numel() * m.bias.element_size()
        logical += m.bias.numel()
    return LayerBytes(logical, n, float(code_bytes + scale_bytes + zero_bytes + bias_bytes), tensors)
