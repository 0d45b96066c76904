"""Write adapters in HF PEFT's on-disk layout, so users can load them with the tools they trust.

`write_peft_adapter` writes the adapter alone (LoRA, QLoRA: their base is the backbone the run
started from). `write_peft_checkpoint` writes base and adapter together, for a method whose base
changed during training (ReLoRA merges every cycle into it and trains some modules full-rank):
`base/` is then a standard HF model dir and `adapter/` the last cycle, and
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)` computes the
run's model (docs/export.md#peft).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from lorabench.errors import ConfigError
from lorabench.surgery import replace_module
from lorabench.utils import atomic_write_text

BASE_DIR = "base"  # write_peft_checkpoint: the HF model dir of the (merged-so-far) base
ADAPTER_DIR = "adapter"  # write_peft_checkpoint: the PEFT adapter over it


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


def base_without_adapters(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRA layer replaced by its base layer (unmerged) and every
    bitsandbytes 4-bit linear dequantized exactly to its quant_state dtype: a plain HF model."""
    from lorabench.adapters.lora import lora_layers
    from lorabench.adapters.qalora import QALoRAVariant

    for name, layer in lora_layers(model):
        if isinstance(layer.variant, QALoRAVariant):
            raise ConfigError(
                f"--export peft: layer '{name}' is a QA-LoRA adapter, whose pooled forward PEFT does not compute "
                "(docs/qalora.md#storage); export the merged model with --export gguf"
            )
        if getattr(layer.base_layer, "is_quantized_linear", False):
            raise ConfigError(f"--export peft: layer '{name}' has an INT-N base, which transformers cannot load")
    try:
        from lorabench.quant import bnb4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        bnb4bit = None
    base = bnb4bit.deepcopy_model(model) if bnb4bit is not None else copy.deepcopy(model)
    for name, layer in lora_layers(base):
        replace_module(base, name, layer.base_layer)
    return bnb4bit.dequantize_model(base) if bnb4bit is not None else base


def write_peft_checkpoint(model: nn.Module, out_dir: Path, config: dict[str, Any]) -> None:
    """`out_dir/base/` (`save_pretrained` of `base_without_adapters`) and `out_dir/adapter/`
    (`write_peft_adapter` with `config`); each dir is written beside and renamed into place."""
    from lorabench.adapters.lora import lora_layers

    if not hasattr(model, "save_pretrained"):
        raise ConfigError("--export peft: the run's model is not a Hugging Face model (no save_pretrained)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub, write in (
        (BASE_DIR, lambda d: base_without_adapters(model).save_pretrained(d)),
        (ADAPTER_DIR, lambda d: write_peft_adapter(d, lora_layers(model), config)),
    ):
        tmp = out_dir / f".{sub}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        tmp.rename(out_dir / sub)
