"""A model with INT-N linears on disk: the HF `config.json`, every tensor in `model.safetensors`
(codes packed, scales and zeros as held), and `intn_config.json` naming the INT-N layers.

Hand-written because no format that standard loaders read holds fractional zero points with
this harness's packing (docs/qalora.md#storage); the layout is self-describing and loads strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from lorabench.errors import ConfigError
from lorabench.quant.intn import IntNLinear
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
            "group_size": m.group_size, "bias": m.bias is not None}
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
    """Rebuild the architecture from `config.json`, put empty IntNLinear layers where the json
    says, and load every tensor strictly (a missing or extra tensor is an error)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = json.loads((path / INTN_CONFIG).read_text())
    if meta.get("format") != "lorabench-intn":
        raise ConfigError(f"{path / INTN_CONFIG}: not a lorabench INT-N model")
    dtype = getattr(torch, meta["dtype"])
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    for name, spec in meta["layers"].items():
        replace_module(
            model, name,
            IntNLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                       spec["bias"], dtype=dtype),
        )
    load_model(model, str(path / "model.safetensors"), strict=True)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def intn_model_bytes(model: nn.Module, skip: Iterable[nn.Parameter] = ()) -> dict[str, float]:
    """Held bytes and the 16-bit size of everything but `skip` (e.g. adapters), counted by
    storage so tied tensors count once: what the model costs on disk and in memory."""
    skipped = {id(p) for p in skip}
    seen: set[int] = set()
    held = 0
    logical = 0
    for module in model.modules():
        if isinstance(module, IntNLinear):
            logical += module.in_features * module.out_features
            for t in (module.qweight, module.scales, module.zeros):
                held += t.numel() * t.element_size()
            if module.bias is not None:
                logical += module.bias.numel()
                held += module.bias.numel() * module.bias.element_size()
            continue
        for p in module.parameters(recurse=False):
            if id(p) in skipped or p.untyped_storage().data_ptr() in seen:
                continue
            seen.add(p.untyped_storage().data_ptr())
            logical += p.numel()
            held += p.numel() * p.element_size()
    return {"merged/model_bytes": float(held), "merged/model_bytes_16bit": float(2 * logical)}
