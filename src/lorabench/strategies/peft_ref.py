"""Reference strategies through HF PEFT: `peft_lora` and `peft_qlora`.

Same backbone (quantized by the same `bnb4bit` step for peft_qlora), same seed, same data,
same config keys as `lora` / `qlora`; only the adapter code is PEFT's (`get_peft_model`).
A sweep over `strategy=lora,peft_lora,qlora,peft_qlora` puts ours beside the one users trust.

`prepare_model_for_kbit_training` is deliberately not called: it upcasts norms and
embeddings to fp32 and turns on gradient checkpointing, i.e. it changes the backbone, and
the point of the reference is an identical backbone (docs/qlora.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lorabench.quant import BaseFormat, bnb4bit
from lorabench.surgery import find_target_linears, replace_module
from lorabench.strategies.lora import LoRA, LoRAConfig
from lorabench.strategies.qlora import QLoRAConfig
from lorabench.strategies.registry import register

ADAPTER = "default"  # PEFT's adapter name


@dataclass
class PeftLoRAConfig(LoRAConfig):
    name: str = "peft_lora"  # registry name


@dataclass
class PeftQLoRAConfig(QLoRAConfig):
    name: str = "peft_qlora"  # registry name


def _peft_target_modules(model: nn.Module, target_modules: object) -> list[str]:
    """The names PEFT should adapt: exactly the layers ours would (our matching rules).

    Module-name suffixes when they select the same set (a readable adapter_config.json),
    else the full names.
    """
    names = find_target_linears(model, target_modules)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    if find_target_linears(model, suffixes) == names:
        return suffixes
    return names


def _peft_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@register
class PeftLoRA(LoRA):
    """LoRA through `peft.get_peft_model` (task CAUSAL_LM), adapters in fp32 as PEFT defaults."""

    name = "peft_lora"
    config_class = PeftLoRAConfig

    def wrap(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        c = self.cfg
        targets = _peft_target_modules(model, c.target_modules)
        self.adapted = find_target_linears(model, targets)
        config = LoraConfig(
            r=c.rank,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            use_rslora=c.rslora,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def merge_to_16bit(self, model: nn.Module) -> nn.Module:
        """A float copy with W = W_base (dequantized if 4-bit) + PEFT's get_delta_weight (exact)."""
        peft_copy = bnb4bit.deepcopy_model(model)
        inner = peft_copy.get_base_model()
        with torch.no_grad():
            for name, layer in _peft_lora_layers(inner):
                base = layer.get_base_layer()
                if isinstance(base, bnb4bit.bnb.nn.Linear4bit):
                    lin = bnb4bit.dequantize_linear4bit(base)
                else:
                    lin = base
                w = lin.weight
                w.copy_((w.float() + layer.get_delta_weight(ADAPTER).float()).to(w.dtype))
                replace_module(inner, name, lin)
        return bnb4bit.dequantize_model(inner)  # quantized linears without an adapter too: all float

    def save_artifacts(self, model: nn.Module, out_dir: Path) -> None:
        """PEFT's own writer: adapter_config.json + adapter_model.safetensors."""
        super().save_artifacts(model, out_dir)
        model.save_pretrained(str(out_dir / "adapter"), save_embedding_layers=False)


@register
class PeftQLoRA(PeftLoRA):
    """PEFT LoRA over the shared bnb 4-bit backbone (PEFT's bnb Linear4bit LoRA layer)."""

    name = "peft_qlora"
    config_class = PeftQLoRAConfig

    def base_format(self) -> Optional[BaseFormat]:
        return self.cfg.bnb_format()

    def wrap(self, model: nn.Module) -> nn.Module:
        # PEFT picks its 4-bit layer only for models flagged as loaded in 4 bits (what
        # transformers sets when it quantizes at load time).
        model.is_loaded_in_4bit = True
        return super().wrap(model)

    def merged_for_eval(self, model: nn.Module, out_dir: Path) -> Optional[nn.Module]:
        """merge=nf4: PEFT's own merge_and_unload (dequantize, add, requantize: lossy)."""
        if self.cfg.merge != "nf4":
            return super().merged_for_eval(model, out_dir)
        peft_copy = bnb4bit.deepcopy_model(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Merge lora module to 4-bit")
            merged = peft_copy.merge_and_unload()
        for _, layer in bnb4bit.linear4bit_layers(merged):
            layer.support_avx512bf16_for_cpu = False
        return merged
