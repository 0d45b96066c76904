"""QA-LoRA (Xu et al., ICLR 2024): group-pooled LoRA over an INT-N base that merges into INT-N.

The backbone's targeted linears are group-wise INT-N (`quant/intn.py`); the adapter pools
its input over each quantization group (`adapters/qalora.py`); at the end the update is folded
into the zero points, the merged model (still INT-N) is saved, reloaded and scored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from lorabench.adapters.lora import merge_and_unload
from lorabench.adapters.qalora import DROPOUT_POSITIONS, POOLINGS, inject_qalora, qalora_layers, save_qalora_adapter
from lorabench.errors import ConfigError
from lorabench.quant import BaseFormat
from lorabench.quant.code_quantizers import CODE_QUANTIZERS
from lorabench.quant.intn import FLOAT_ZEROS, SUPPORTED_BITS
from lorabench.quant.intn_io import intn_model_bytes, load_intn_model, save_intn_model
from lorabench.strategies.base import Strategy, StrategyConfig, check_rank_and_dropout
from lorabench.strategies.registry import register

MERGED_DIR = "merged_intn"  # sub-dir of the run dir holding the merged INT-N model
ADAPTER_DIR = "adapter"  # sub-dir of the run dir holding the trained adapter (format lorabench-qalora)


@dataclass
class QALoRAConfig(StrategyConfig):
    name: str = "qalora"  # registry name
    lr: float = 2e-3  # tuned on the default task with pooling=sum (INT4, seed 0: 2e-3 → 44% exact match; 1e-2 unstable)
    bits: int = 4  # INT-N width of the base weights (2, 3, 4 or 8)
    group_size: int = 32  # g: quantization group along in_features, also the pooling group
    quantizer: str = "rtn"  # how the codes are chosen: rtn (round-to-nearest from min/max) | hqq (optimized fractional zeros, fp16); gptq not yet
    pooling: str = "sum"  # sum (paper's Algorithm 1; learns best here) | mean (official code; 7-25% at lr 1e-2..1e-1): docs/qalora.md#pooling
    rank: int = 8  # r: rank of the pooled update B@A
    alpha: float = 16.0  # α: the update is scaled by α/r
    dropout: float = 0.0  # dropout on the adapter's input (where: dropout_position)
    dropout_position: str = "after_pool"  # after_pool: dropout(pool(x)), official code, mask in/g wide | before_pool: PEFT's pool(dropout(x))
    target_modules: Any = "all-linear"  # linears that get pooled adapters: 'all-linear' or a list of names (q_proj, ...)
    quantize_modules: Any = "all-linear"  # linears quantized to INT-N: the whole decoder, as the paper (must include the targets)
    merge: str = "zeros"  # none | zeros: fold the adapter into the zero points, save, reload and score
    merged_zeros: str = "fp32"  # merged zero points held as fp32 (merged = unmerged, N + 48/g bits/weight) | fp16 (official code, N + 32/g, rounds z'): docs/qalora.md#storage

    merge_choices = ("none", "zeros")

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"strategy.bits: INT-N supports bits in {list(SUPPORTED_BITS)}, got {self.bits}")
        if self.group_size <= 0:
            raise ConfigError(f"strategy.group_size: must be a positive integer, got {self.group_size}")
        CODE_QUANTIZERS.get(self.quantizer)  # one line naming strategy.quantizer and the choices
        if self.pooling not in POOLINGS:
            raise ConfigError(f"strategy.pooling: expected one of {list(POOLINGS)}, got '{self.pooling}'")
        check_rank_and_dropout(self.rank, self.dropout)
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ConfigError(f"strategy.dropout_position: expected one of {list(DROPOUT_POSITIONS)}, got '{self.dropout_position}'")
        if self.merged_zeros not in FLOAT_ZEROS:
            raise ConfigError(f"strategy.merged_zeros: expected one of {list(FLOAT_ZEROS)}, got '{self.merged_zeros}'")
        if self.merge not in self.merge_choices:
            raise ConfigError(f"strategy.merge: expected one of {list(self.merge_choices)}, got '{self.merge}'")


@register
class QALoRA(Strategy):
    """INT-N base (frozen codes, scales, zeros) + trainable fp32 pooled A and B."""

    name = "qalora"
    config_class = QALoRAConfig
    label_keys = {"bits": "int", "rank": "r", "pooling": ""}
    lossless_merge = {"merge": "zeros", "merged_zeros": "fp32"}  # fp32 zeros: exact up to float rounding

    def base_format(self) -> Optional[BaseFormat]:
        c = self.cfg
        return BaseFormat(
            "intn", c.quantize_modules, {"bits": c.bits, "group_size": c.group_size, "quantizer": c.quantizer}
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        self.adapted = inject_qalora(
            model, c.target_modules, c.rank, c.alpha, c.dropout, c.pooling, group_size=c.group_size,
            dropout_position=c.dropout_position, merged_zeros=c.merged_zeros,
        )
        return model

    # The seed formula bits/8·N + 16M comes from Strategy.formula_bytes via BaseFormat.bits_per_weight.

    def merge_to_intn(self, model: nn.Module) -> nn.Module:
        """A copy of the model with every adapter folded into its zero points (still INT-N)."""
        return merge_and_unload(copy.deepcopy(model))

    def merged_for_eval(self, model: nn.Module, out_dir: Path) -> Optional[nn.Module]:
        """Merge into the zeros, save the INT-N model into `out_dir/merged_intn`, reload it and
        return the reloaded copy, so the score is that of the artifact on disk."""
        if self.cfg.merge == "none":
            return None
        merged = self.merge_to_intn(model)
        path = Path(out_dir) / MERGED_DIR
        save_intn_model(merged, path, extra={"merged_from": "qalora", "pooling": self.cfg.pooling,
                                             "merged_zeros": self.cfg.merged_zeros})
        device = next(iter(merged.buffers())).device
        reloaded = load_intn_model(path, device=device)
        reloaded.train(model.training)
        self.merged_bytes = intn_model_bytes(reloaded)
        return reloaded

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Bytes of the merged INT-N model as reloaded from its file (packed codes, fp16 scales,
        fp32 or fp16 zeros, unquantized parts; tied tensors once) vs the same model with every
        weight in 16-bit; absent with merge=none. The merge costs bytes: N-bit zeros become
        floats, (32 − N)/g bits per weight with fp32 zeros, (16 − N)/g with fp16."""
        return dict(getattr(self, "merged_bytes", {}))

    def save_artifacts(self, model: nn.Module, out_dir: Path) -> None:
        """`final_state.pt`, and the trained pooled adapter in this harness's own format
        (`adapter/`, format `lorabench-qalora`, A is r × in/g): not PEFT's `use_qalora`, whose
        forward pools differently (docs/qalora.md#storage). The merged model is written by
        `merged_for_eval`."""
        super().save_artifacts(model, out_dir)
        c = self.cfg
        layers = qalora_layers(model)
        config = {
            "pooling": c.pooling,
            "group_size": c.group_size,
            "bits": c.bits,
            "quantizer": c.quantizer,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "scaling": layers[0][1].scaling if layers else c.alpha / c.rank,
            "lora_dropout": c.dropout,
            "dropout_position": c.dropout_position,
        }
        save_qalora_adapter(Path(out_dir) / ADAPTER_DIR, layers, config)
