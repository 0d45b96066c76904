"""A model with INT-N linears on disk: the HF `config.json`, every tensor in `model.safetensors`
(codes packed, fp16 scales, zero points as held: packed N-bit integers, or fp32/fp16 once a
merge made them fractional), and `intn_config.json` naming the INT-N layers and their zero layout.

Hand-written because no format that standard loaders read holds fractional zero points with
this harness's packing (docs/qalora.md#storage); the layout is self-describing and loads strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from lorabench.errors import ConfigError
from lorabench.quant.intn import FLOAT_ZEROS, IntNLinear, intn_layer_bytes
from lorabench.surgery import replace_module
from lorabench.utils import atomic_write_text

INTN_CONFIG = "intn_config.json"  # which layers are INT-N, and their format


def save_intn_model(model: nn.Module, path: Path, extra: Optional[dict[str, Any]] = None) -> None:
    """`model.safetensors` (every tensor, codes packed) + the HF `config.json` + `intn_config.json`."""
    if not hasattr(model, "config"):
        raise ConfigError("saving an INT-N model needs a Hugging Face model (with .config)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = {
        n: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "group_size": m.group_size, "bias": m.bias is not None,
            "zeros": m.zero_layout}
        for n, m in model.named_modules()
        if isinstance(m, IntNLinear)
    }
    dtypes = {p.dtype for p in model.parameters()}
    dtype = str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else "float32"
    model.config.save_pretrained(path)
    tmp = path / "model.safetensors.tmp"
    save_model(model, str(tmp))  # handles tied embeddings (saved once)
    tmp.replace(path / "model.safetensors")
    meta = {"format": "lorabench-intn", "dtype": dtype, "layers": layers, **(extra or {})}
    atomic_write_text(path / INTN_CONFIG, json.dumps(meta, indent=2))


def load_intn_model(path: Path, device: Optional[torch.device] = None) -> nn.Module:
    """Rebuild the architecture from `config.json`, put empty IntNLinear layers (with the zero
    layout the json names) where the json says, and load every tensor strictly: a missing or
    extra tensor, or one of another dtype or shape, is one ConfigError line naming the file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta_path = path / INTN_CONFIG
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{meta_path}: not a readable INT-N config ({type(e).__name__})") from e
    if meta.get("format") != "lorabench-intn":
        raise ConfigError(f"{meta_path}: not a lorabench INT-N model")
    dtype = getattr(torch, meta["dtype"])
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    for name, spec in meta["layers"].items():
        if spec.get("zeros") not in ZERO_LAYOUTS:
            raise ConfigError(f"{meta_path}: layer '{name}' zeros must be one of {list(ZERO_LAYOUTS)}, got {spec.get('zeros')!r}")
        replace_module(
            model, name,
            IntNLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                       spec["bias"], dtype=dtype, fractional_zeros=spec["zeros"] in FLOAT_ZEROS,
                       zeros_dtype=FLOAT_ZEROS.get(spec["zeros"], torch.float16)),
        )
    check_tensors(model, path / "model.safetensors")
    load_model(model, str(path / "model.safetensors"), strict=True)
    if device is not None:
        model.to(device)
    model.eval()
    return model


ZERO_LAYOUTS = ("packed", *FLOAT_ZEROS)  # intn_config.json `zeros`: N-bit packed integers | fp32 | fp16 (after a merge)


def check_tensors(model: nn.Module, file: Path) -> None:
    """Every tensor the model expects is in `file` with its dtype and shape, and nothing else
    (load_state_dict would silently cast a dtype)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            stored = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: (tuple(v.get_shape()), v.get_dtype()) for k, v in stored.items()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ConfigError(f"{file}: not a readable safetensors file ({type(e).__name__})") from e
    want = model.state_dict()
    names = {k for k in want if k in shapes}
    # tied tensors are stored once under one of their names (safetensors' save_model)
    stored_ptrs = {want[o].data_ptr() for o in names}
    missing = [k for k in want if k not in shapes and want[k].data_ptr() not in stored_ptrs]
    extra = sorted(set(shapes) - set(want))
    if missing or extra:
        raise ConfigError(f"{file}: missing tensors {missing[:3]}, unexpected {extra[:3]}")
    for k in names:
        shape, dtype = shapes[k]
        t = want[k]
        if shape != tuple(t.shape) or dtype != SAFETENSORS_DTYPES.get(t.dtype):
            raise ConfigError(f"{file}: {k} is {dtype} {shape}, expected {SAFETENSORS_DTYPES.get(t.dtype)} {tuple(t.shape)}")


SAFETENSORS_DTYPES = {  # torch dtype -> safetensors' dtype name
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
    torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL",
}


def intn_model_bytes(model: nn.Module, skip: Iterable[nn.Parameter] = ()) -> dict[str, float]:
    """Held bytes and the 16-bit size of everything but `skip` (e.g. adapters), counted by
    storage so tied tensors count once: what the model costs on disk and in memory."""
    skipped = {id(p) for p in skip}
    seen: set[int] = set()
    held = 0
    logical = 0
    for module in model.modules():
        if isinstance(module, IntNLinear):
            lb = intn_layer_bytes(module)
            logical += lb.logical_params
            held += sum(t.numel() * t.element_size() for t in lb.tensors)
            continue
        for p in module.parameters(recurse=False):
            if id(p) in skipped or p.untyped_storage().data_ptr() in seen:
                continue
            seen.add(p.untyped_storage().data_ptr())
            logical += p.numel()
            held += p.numel() * p.element_size()
    return {"merged/model_bytes": float(held), "merged/model_bytes_16bit": float(2 * logical)}
