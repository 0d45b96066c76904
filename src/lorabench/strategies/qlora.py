"""QLoRA (Dettmers et al., 2023): the `lora` adapter over the shared bitsandbytes 4-bit backbone.

Nothing of the adapter is re-implemented here: `QLoRA` is `LoRA` with a `base_format()`
asking for NF4/FP4 linears, and a 16-bit merge that first dequantizes each 4-bit base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from lorabench.adapters.lora import lora_layers, merge_and_unload
from lorabench.quant import BaseFormat, bnb4bit, quantize_backbone
from lorabench.strategies.lora import LoRA, LoRAConfig
from lorabench.strategies.registry import register


@dataclass
class QLoRAConfig(LoRAConfig):
    name: str = "qlora"  # registry name
    lr: float = 3e-3  # tuned on the default task like lora; the paper's 2e-4 is in strategy/qlora_paper.yaml
    quant_type: str = "nf4"  # nf4 (the paper's NormalFloat) | fp4
    double_quant: bool = True  # quantize the per-block absmax to 8 bits (blocks of 256)
    blocksize: int = 64  # weights per absmax block (bitsandbytes: 32..4096, powers of 2)
    compute_dtype: str = "bf16"  # dtype of the 4-bit matmul: bf16 | fp16 | fp32

    # nf4: merge, then requantize to the base's 4-bit format (lossy; nf4 or fp4 as quant_type says)
    merge_choices = LoRAConfig.merge_choices + ("nf4",)

    def validate(self) -> None:
        super().validate()
        bnb4bit.check_options(self.quant_type, self.double_quant, self.blocksize, self.compute_dtype)

    def bnb_format(self) -> BaseFormat:
        """The backbone format these keys describe (shared with peft_qlora)."""
        return BaseFormat(
            "bnb4bit",
            self.quantize_modules,
            {
                "quant_type": self.quant_type,
                "double_quant": self.double_quant,
                "blocksize": self.blocksize,
                "compute_dtype": self.compute_dtype,
            },
        )


@register
class QLoRA(LoRA):
    """Frozen 4-bit base (bitsandbytes Linear4bit), trainable fp32 LoRA A and B."""

    name = "qlora"
    config_class = QLoRAConfig
    label_keys = {"quant_type": "", "rank": "r"}

    def base_format(self) -> Optional[BaseFormat]:
        return self.cfg.bnb_format()

    def merge_to_16bit(self, model: nn.Module) -> nn.Module:
        """A copy whose adapted 4-bit bases are dequantized to float, then merged (exact).

        Dequantizing reads the standard packed layout (a CPU inference repack is undone
        first), and W_dq + (α/r)·B@A is what the adapter model computes, up to the
        rounding of the 4-bit layer's compute dtype.
        """
        merged = bnb4bit.deepcopy_model(model)
        for _, layer in lora_layers(merged):
            if isinstance(layer.base_layer, bnb4bit.bnb.nn.Linear4bit):
                layer.base_layer = bnb4bit.dequantize_linear4bit(layer.base_layer)
        # the quantized linears without an adapter (quantize_modules ⊋ target_modules) too: all float
        return bnb4bit.dequantize_model(merge_and_unload(merged))

    def merge_to_4bit(self, model: nn.Module) -> nn.Module:
        """Merge into 16-bit, then requantize the quantized set to the base's format (lossy)."""
        merged = self.merge_to_16bit(model)
        fmt = self.cfg.bnb_format()
        quantize_backbone(merged, fmt)
        return merged

    def merged_for_eval(self, model: nn.Module, out_dir: Path) -> Optional[nn.Module]:
        if self.cfg.merge == "nf4":
            return self.merge_to_4bit(model)
        return super().merged_for_eval(model, out_dir)

