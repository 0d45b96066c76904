"""The shared 4-bit backbone: targeted linears become bitsandbytes `Linear4bit` (NF4/FP4).

Every 4-bit strategy (qlora, peft_qlora, a 4-bit relora) declares
`BaseFormat("bnb4bit", targets, {quant_type, double_quant, blocksize, compute_dtype})`
and gets its backbone from `quantize_bnb4bit`; embeddings, norms and lm_head are never
touched because only the named linears are replaced.

Two bitsandbytes 0.50 facts shape this file:
- On a CPU with AVX512-BF16, the first eval-mode no-grad forward of a `Linear4bit` repacks
  its weight into an inference layout for good; later training forwards then take a kernel
  without autograd (wrong gradients, only a warning), and a plain dequantize of the
  repacked bytes gives garbage (docs/qlora.md#bitsandbytes-on-cpu). Every layer built here has `support_avx512bf16_for_cpu = False`.
- `Params4bit.numel()` is half the logical size and the quantization constants live in
  `quant_state`, outside `named_parameters()`: the accounting registered below counts them.

Cache: none. Quantizing is a per-layer blockwise pass (milliseconds on the tiny model,
seconds for a 7B model on GPU), far cheaper than loading the 16-bit weights it starts from;
a sweep that wants to skip the 16-bit load can save the quantized state dict (bnb's
`Linear4bit` state dict carries its quant_state) once per (model, format) and load it.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import nn

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF

from lorabench.quant import register_quantizer
from lorabench.surgery import replace_module
from lorabench.errors import ConfigError
from lorabench.memory import LayerBytes, register_accounting
from lorabench.utils import DTYPES, module_device

QUANT_TYPES = ("nf4", "fp4")
# The block sizes bitsandbytes' quantize_4bit accepts (it raises on any other).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = DTYPES


def check_options(
    quant_type: str,
    double_quant: bool,
    blocksize: int,
    compute_dtype: str,
    device: Optional[torch.device] = None,
    key_prefix: str = "strategy",
) -> torch.dtype:
    """Validate the 4-bit options (one-line ConfigError naming the key); return the compute dtype.

    With `device`, also refuse a compute dtype that device cannot run.
    """
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"{key_prefix}.quant_type: expected one of {list(QUANT_TYPES)}, got '{quant_type}'")
    if not isinstance(double_quant, bool):
        raise ConfigError(f"{key_prefix}.double_quant: expected true or false, got '{double_quant}'")
    if blocksize not in BLOCKSIZES:
        raise ConfigError(
            f"{key_prefix}.blocksize: bitsandbytes supports {list(BLOCKSIZES)}, got {blocksize}"
        )
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"{key_prefix}.compute_dtype: expected one of {list(COMPUTE_DTYPES)}, got '{compute_dtype}'"
        )
    dtype = COMPUTE_DTYPES[compute_dtype]
    if device is not None and not device_supports(device, dtype):
        raise ConfigError(
            f"{key_prefix}.compute_dtype: {compute_dtype} is not supported on device '{device}'; use fp32"
            + (" or fp16" if device.type == "cuda" else "")
        )
    return dtype


def device_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a 4-bit matmul in `dtype` can run on `device` (bf16 needs Ampere+ on CUDA)."""
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            return bool(torch.cuda.is_bf16_supported())
        return True
    if device.type == "cpu":
        # bitsandbytes' CPU path dequantizes and calls torch: fp32 and bf16 work; fp16
        # matmuls work in torch >= 2.1 on CPU but check rather than assume.
        if dtype == torch.float16:
            try:
                a = torch.ones(2, 2, dtype=torch.float16)
                (a @ a).sum().item()
            except RuntimeError:
                return False
        return True
    return dtype == torch.float32


def to_linear4bit(
    linear: nn.Linear,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> "bnb.nn.Linear4bit":
    """Quantize one float linear into a frozen `Linear4bit` on the same device.

    The layer is built on the meta device (no throwaway full-size init, no RNG draw, so
    adapter init after quantization is the same as without it), then its weight is
    quantized from the float weight; quant_state.dtype is the float weight's dtype, so
    dequantizing gives back that dtype.
    """
    w = linear.weight.detach()
    device = w.device
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        w.contiguous(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
        module=layer,
    ).to(device)  # Params4bit quantizes on its first .to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # docs/qlora.md#bitsandbytes-on-cpu: never repack for CPU inference (silently wrong grads and merges after).
    layer.support_avx512bf16_for_cpu = False
    return layer


@register_quantizer("bnb4bit")
def quantize_bnb4bit(
    model: nn.Module,
    names: list[str],
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: str = "bf16",
    bits: int = 4,
) -> None:
    """Replace each named nn.Linear of `model` by a bitsandbytes Linear4bit, in place.

    `bits` is accepted (and must be 4) because BaseFormat may carry it for the seed formula.
    """
    if bits != 4:
        raise ConfigError(f"strategy.bits: the bnb4bit format stores 4 bits per weight, got {bits}")
    dtype = check_options(quant_type, double_quant, blocksize, compute_dtype, module_device(model))
    layers = []
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, bnb.nn.Linear4bit):
            layers.append(old)
            continue
        if not isinstance(old, nn.Linear):
            raise ConfigError(f"strategy.target_modules: '{name}' is a {type(old).__name__}, not an nn.Linear")
        new = to_linear4bit(old, quant_type, double_quant, blocksize, dtype)
        replace_module(model, name, new)
        layers.append(new)
    share_nested_code(layers)


def share_nested_code(layers: list["bnb.nn.Linear4bit"]) -> None:
    """Record how many layers share each second-level code table (bnb reuses one for all).

    The expected bytes then count that table once per model, as the measured bytes do;
    the record holds the table's address, so a deep copy (which gives every layer its own
    table) falls back to counting it per layer.
    """
    counts: dict[int, int] = {}
    for layer in layers:
        qs = layer.weight.quant_state
        if qs is not None and qs.nested:
            ptr = qs.state2.code.data_ptr()
            counts[ptr] = counts.get(ptr, 0) + 1
    for layer in layers:
        qs = layer.weight.quant_state
        if qs is not None and qs.nested:
            ptr = qs.state2.code.data_ptr()
            layer._lorabench_nested_code_share = (ptr, counts[ptr])


def unpacked_state(layer: "bnb.nn.Linear4bit") -> tuple[torch.Tensor, Any]:
    """The packed weight and quant_state in bnb's standard layout.

    A CPU-repacked layer (never one built here) is read back through bitsandbytes' own
    inverse; the repack stored absmax in bf16, so that read is exact only to bf16 rounding
    of the scales, but it is not the garbage a direct dequantize of the repacked bytes gives.
    """
    w = layer.weight
    qs = w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(w.data, qs)
    return w.data, qs


def dequantized_weight(layer: "bnb.nn.Linear4bit", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float weight a Linear4bit represents (out × in), in quant_state.dtype unless `dtype`."""
    data, qs = unpacked_state(layer)
    w = bnbF.dequantize_4bit(data, qs)
    return w if dtype is None else w.to(dtype)


def dequantize_linear4bit(layer: "bnb.nn.Linear4bit", dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A plain frozen nn.Linear holding exactly the dequantized weight (and the bias)."""
    w = dequantized_weight(layer, dtype)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.detach().clone().to(w.dtype), requires_grad=False)
    return lin


def layer_options(layer: "bnb.nn.Linear4bit") -> dict[str, Any]:
    """The to_linear4bit options that rebuild `layer`'s format."""
    qs = layer.weight.quant_state
    return {
        "quant_type": qs.quant_type,
        "double_quant": bool(qs.nested),
        "blocksize": int(qs.blocksize),
        "compute_dtype": layer.compute_dtype or torch.float32,
    }


def requantize(linear: nn.Linear, like: "bnb.nn.Linear4bit") -> "bnb.nn.Linear4bit":
    """Quantize `linear` into the same 4-bit format as `like` (lossy: rounds to the 4-bit grid)."""
    return to_linear4bit(linear, **layer_options(like))


def requantize_weight(layer: "bnb.nn.Linear4bit", weight: torch.Tensor) -> "bnb.nn.Linear4bit":
    """A new Linear4bit holding `weight` (out × in, any float dtype) in `layer`'s format, bias kept.

    ReLoRA's merge into a 4-bit base goes through here: dequantize, add, requantize.
    """
    dtype = layer.weight.quant_state.dtype
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype)
    lin.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        lin.bias = layer.bias
    return requantize(lin, layer)


def layer_state(layer: "bnb.nn.Linear4bit") -> dict[str, Any]:
    """The 4-bit layer as plain tensors (packed weight, packed quant_state, bias): exact, and
    loadable with torch.load(weights_only=True)."""
    data, qs = unpacked_state(layer)
    bias = layer.bias
    return {
        "data": data.detach().clone(),
        "stats": {k: v.clone() for k, v in qs.as_dict(packed=True).items()},
        "bias": None if bias is None else bias.detach().clone(),
    }


def layer_from_state(state: dict[str, Any], like: "bnb.nn.Linear4bit") -> "bnb.nn.Linear4bit":
    """Rebuild, bit for bit, the Linear4bit that `layer_state` saved (`like` gives shape and compute dtype)."""
    qs = like.weight.quant_state
    new = bnb.nn.Linear4bit(
        like.in_features, like.out_features, bias=state["bias"] is not None,
        compute_dtype=like.compute_dtype, compress_statistics=bool(qs.nested), quant_type=qs.quant_type, device="meta",
    )
    new.weight = bnb.nn.Params4bit.from_prequantized(
        data=state["data"], quantized_stats=state["stats"], requires_grad=False, device=state["data"].device, module=new
    )
    if state["bias"] is not None:
        new.bias = nn.Parameter(state["bias"].clone(), requires_grad=False)
    new.support_avx512bf16_for_cpu = False  # docs/qlora.md#bitsandbytes-on-cpu
    return new


def deepcopy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy, then point every copied Params4bit back at its own module.

    (Params4bit.__deepcopy__ keeps `.module` pointing at the original layer, so a later
    requantize of the copy would write its quant_state onto the original module.)
    """
    new = copy.deepcopy(model)
    for m in new.modules():
        if isinstance(m, bnb.nn.Linear4bit) and isinstance(m.weight, bnb.nn.Params4bit):
            m.weight.module = m
            m.quant_state = m.weight.quant_state
    return new


def linear4bit_layers(model: nn.Module) -> list[tuple[str, "bnb.nn.Linear4bit"]]:
    """Every Linear4bit in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every Linear4bit of `model` (in place) by its exact float nn.Linear."""
    for name, layer in linear4bit_layers(model):
        replace_module(model, name, dequantize_linear4bit(layer, dtype))
    return model


# ---- memory accounting ---------------------------------------------------------------------


def expected_linear4bit_bytes(
    n: int, blocksize: int, double_quant: bool, nested_blocksize: int = 256, code_share: int = 1
) -> float:
    """Bytes a bnb 4-bit matrix of n weights holds, from the format's definition.

    Packed weight n/2 B, the 16-entry fp32 code table (64 B). Without double quant: fp32
    absmax per block. With it: uint8 absmax per block, fp32 second-level absmax per
    `nested_blocksize` blocks, the 256-entry fp32 second-level code table (shared by
    `code_share` layers) and the fp32 offset (0-d tensor).
    """
    blocks = math.ceil(n / blocksize)
    total = math.ceil(n / 2) + 16 * 4
    if double_quant:
        total += blocks * 1 + math.ceil(blocks / nested_blocksize) * 4 + 256 * 4 / code_share + 4
    else:
        total += blocks * 4
    return float(total)


@register_accounting(bnb.nn.Linear4bit)
def account_linear4bit(layer: "bnb.nn.Linear4bit") -> LayerBytes:
    """Logical size from quant_state.shape; expected from the format; every tensor held."""
    w = layer.weight
    qs = getattr(w, "quant_state", None)
    bias_n = layer.bias.numel() if layer.bias is not None else 0
    bias_b = bias_n * layer.bias.element_size() if layer.bias is not None else 0
    if qs is None:  # not quantized yet: a plain float linear
        n = w.numel()
        return LayerBytes(n + bias_n, 0, float(n * w.element_size() + bias_b), [w] + ([layer.bias] if bias_n else []))
    n = int(math.prod(qs.shape))
    share = 1
    if qs.nested:
        rec = getattr(layer, "_lorabench_nested_code_share", None)
        if rec is not None and rec[0] == qs.state2.code.data_ptr():
            share = rec[1]
    expected = expected_linear4bit_bytes(
        n, int(qs.blocksize), bool(qs.nested), int(qs.state2.blocksize) if qs.nested else 256, share
    )
    tensors: list[torch.Tensor] = [w, qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    if layer.bias is not None:
        tensors.append(layer.bias)
    return LayerBytes(n + bias_n, n, expected + bias_b, tensors)
