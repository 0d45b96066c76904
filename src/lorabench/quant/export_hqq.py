"""Export a merged INT-N model (QA-LoRA merged into its zero points) in HQQ's format, which the
`hqq` package saves and loads (`AutoHQQHFModel.save_quantized` / `from_quantized`).

Why HQQ as well as GGUF: HQQ's layer computes `W = (W_q − zero)·scale` with one float scale and
one float zero per group of g consecutive inputs (`axis=1`), kept in the compute dtype: the
harness's `s·(q − z')` exactly (fp16 s, and z' held in fp32 or fp16, are exact in fp32), at every width the harness has
(2, 3, 4, 8 bits) and any g, where GGUF Q4_1 holds only INT2/3/4 with g a multiple of 32.
The cost: only the `hqq` package reads it (transformers 5.x does not load HQQ checkpoints:
docs/export.md#hqq-export). Each layer is built by hqq itself from the dequantized weight (no
optimizer pass), then its codes, scales and zeros are replaced by the harness's.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.quant.intn import IntNLinear, dequantize_state, unpack_codes
from lorabench.surgery import replace_module


def to_hqq_linear(layer: IntNLinear) -> nn.Module:
    """An hqq `HQQLinear` (fp32 compute) computing exactly the layer's `s·(q − z)` (+ bias)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

    w = dequantize_state(layer.qweight, layer.scales, layer.zero_tensor(), layer.shape)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.float())
    cfg = BaseQuantizeConfig(nbits=layer.bits, group_size=layer.group_size, axis=1)
    cfg["weight_quant_params"]["optimize"] = False  # the codes are replaced below anyway
    new = HQQLinear(lin, cfg, compute_dtype=torch.float32, device=str(w.device), del_orig=True)
    g = layer.group_size
    codes = unpack_codes(layer.qweight, layer.bits, layer.in_features).float().reshape(-1, g)
    packed = Quantizer.pack[new.meta["packing"]](codes)
    if packed.shape != new.W_q.shape or packed.dtype != new.W_q.dtype:
        raise ConfigError(f"--export hqq: hqq packs {layer.bits}-bit codes as {tuple(new.W_q.shape)}, got {tuple(packed.shape)}")
    with torch.no_grad():
        new.W_q.data = packed.to(new.W_q.device)
    new.meta["scale"] = layer.scales.float().t().reshape(-1, 1).to(w.device)
    new.meta["zero"] = layer.zero_points().t().reshape(-1, 1).to(w.device)
    return new


def export_hqq(model: nn.Module, tokenizer: Any, out_dir: Path) -> dict[str, int]:
    """`out_dir`: hqq's `config.json` + `qmodel.pt` (every INT-N linear as an HQQLinear) and the
    tokenizer; load with `AutoHQQHFModel.from_quantized(out_dir, compute_dtype=torch.float32)`."""
    from hqq.models.hf.base import AutoHQQHFModel

    layers = [n for n, m in model.named_modules() if isinstance(m, IntNLinear)]
    if not layers:
        raise ConfigError("--export hqq: the merged model has no INT-N layer (export a float model with --export gguf)")
    copied = copy.deepcopy(model)
    for name in layers:
        replace_module(copied, name, to_hqq_linear(copied.get_submodule(name)))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoHQQHFModel.save_quantized(copied, str(tmp))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)  # written beside, then renamed into place
    tmp.rename(out_dir)
    return {"hqq_layers": len(layers), "bytes": sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())}
