"""LoRA (Hu et al., 2021) over a 16/32-bit base, behaving as HF PEFT's LoRA."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from lorabench.adapters.lora import inject_lora, lora_layers, merge_and_unload
from lorabench.adapters.peft_format import write_peft_adapter
from lorabench.errors import ConfigError
from lorabench.quant import BaseFormat, quantize_backbone
from lorabench.quant.code_quantizers import CODE_QUANTIZERS
from lorabench.quant.intn import SUPPORTED_BITS
from lorabench.strategies.base import Strategy, StrategyConfig, check_rank_and_dropout
from lorabench.strategies.registry import register


@dataclass
class LoRAConfig(StrategyConfig):
    name: str = "lora"  # registry name
    lr: float = 3e-3  # tuned on the default task: escapes the loss plateau, 1e-2 does not (docs/defaults.md)
    rank: int = 8  # r: rank of the update B@A
    alpha: float = 16.0  # α: the update is scaled by α/r
    dropout: float = 0.0  # dropout on the adapter input only
    rslora: bool = False  # scale by α/√r instead of α/r (rank-stabilised LoRA)
    target_modules: Any = "all-linear"  # linears that get adapters: 'all-linear' or a list of module names (q_proj, ...)
    quantize_modules: Any = "all-linear"  # linears quantized (4-bit base; merge=intn): the whole decoder, as the papers do
    merge: str = "none"  # none | 16bit | intn: also score the merged model (intn: merged, then quantized to INT-N)
    merge_bits: int = 4  # merge=intn: bits of the post-merge quantization
    merge_group_size: int = 32  # merge=intn: group size along in_features of that quantization
    merge_quantizer: str = "rtn"  # merge=intn: how that quantization picks codes: rtn | hqq (as qalora's strategy.quantizer)

    merge_choices = ("none", "16bit", "intn")

    def validate(self) -> None:
        check_rank_and_dropout(self.rank, self.dropout)
        if self.merge not in self.merge_choices:
            raise ConfigError(f"strategy.merge: expected one of {list(self.merge_choices)}, got '{self.merge}'")
        if self.merge == "intn":  # refuse before training, not after it at merge time
            if self.merge_bits not in SUPPORTED_BITS:
                raise ConfigError(f"strategy.merge_bits: expected one of {list(SUPPORTED_BITS)}, got {self.merge_bits}")
            if self.merge_group_size <= 0:
                raise ConfigError(f"strategy.merge_group_size: expected a positive group size, got {self.merge_group_size}")
            if self.merge_quantizer not in CODE_QUANTIZERS.names():
                raise ConfigError(f"strategy.merge_quantizer: expected one of {sorted(CODE_QUANTIZERS.names())}, "
                                  f"got '{self.merge_quantizer}'")


@register
class LoRA(Strategy):
    """Frozen base, trainable fp32 A and B on the targeted linears."""

    name = "lora"
    config_class = LoRAConfig
    label_keys = {"rank": "r"}
    lossless_merge = {"merge": "16bit"}

    def wrap(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        self.adapted = inject_lora(model, c.target_modules, c.rank, c.alpha, c.dropout, c.rslora)
        return model

    def merge_to_16bit(self, model: nn.Module) -> nn.Module:
        """A copy of the model with every adapter merged into a plain float weight (exact)."""
        return merge_and_unload(copy.deepcopy(model))

    def merged_for_eval(self, model: nn.Module, out_dir: Path) -> Optional[nn.Module]:
        """merge=16bit: the exact merged copy; merge=intn: that copy, quantized to INT-N with
        QA-LoRA's own quantizers (`merge_quantizer`): "QLoRA merged, then RTN/HQQ INT-N" (the QA-LoRA
        paper's baseline quantizes the merged weights with GPTQ instead)."""
        if self.cfg.merge == "none":
            return None
        merged = self.merge_to_16bit(model)
        if self.cfg.merge == "intn":
            fmt = BaseFormat(
                "intn",
                self.cfg.quantize_modules,
                {"bits": self.cfg.merge_bits, "group_size": self.cfg.merge_group_size,
                 "quantizer": self.cfg.merge_quantizer},
            )
            quantize_backbone(merged, fmt)
        return merged

    def save_artifacts(self, model: nn.Module, out_dir: Path) -> None:
        super().save_artifacts(model, out_dir)
        save_peft_adapter(model, out_dir / "adapter", self.cfg)


def save_peft_adapter(model: nn.Module, out_dir: Path, cfg: LoRAConfig) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` in HF PEFT's layout."""
    config = {
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "fan_in_fan_out": False,
    }
    write_peft_adapter(out_dir, lora_layers(model), config)
