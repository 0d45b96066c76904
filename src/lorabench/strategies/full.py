"""Full fine-tuning: the baseline every adapter method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorabench.strategies.base import Strategy, StrategyConfig
from lorabench.strategies.registry import register


@dataclass
class FullConfig(StrategyConfig):
    name: str = "full"  # registry name
    lr: float = 5e-4  # tuned on the default task (higher diverges, lower learns too slowly; docs/defaults.md)


@register
class Full(Strategy):
    """Every parameter trains; memory is the 16 B/param of fp32 weight, grad and AdamW moments."""

    name = "full"
    config_class = FullConfig

    def wrap(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def formula_bytes(self, n_base: int, n_trainable: int) -> int:
        return 16 * n_trainable
