"""Write adapters in HF PEFT's on-disk layout, so users can load them with the tools they trust."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from lorabench.utils import atomic_write_text


def write_peft_adapter(out_dir: Path, layers: list[tuple[str, nn.Module]], config: dict[str, Any]) -> None:
    """`adapter_model.safetensors` (keys `base_model.model.<layer>.lora_{A,B}.weight`) and
    `adapter_config.json` (`config` plus peft_type, task_type and target_modules), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers:
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    tmp = out_dir / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out_dir / "adapter_model.safetensors")
    full = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
        "bias": "none",
        "inference_mode": True,
        **config,
    }
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(full, indent=2))
