"""The strategy interface: everything the trainer may ask of a fine-tuning method.

A strategy sees only its own config node (a validated dataclass instance). The trainer
never branches on a strategy's name; it only calls these hooks, so adding a method is
one file in `strategies/` plus one YAML in `conf/strategy/`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn


@dataclass
class StrategyConfig:
    """Keys every strategy node has; each strategy extends this dataclass with its own."""

    name: str = "???"  # registry name of the strategy (set by its YAML)
    lr: float = 1e-3  # learning rate tuned for this strategy on the default task; optim.lr defaults to it


def check_rank_and_dropout(rank: int, dropout: float) -> None:
    """The checks every low-rank adapter config shares (one-line errors naming the key)."""
    from lorabench.errors import ConfigError

    if rank <= 0:
        raise ConfigError(f"strategy.rank: must be a positive integer, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"strategy.dropout: must be in [0, 1), got {dropout}")


@dataclass
class BaseFormat:
    """The weight format a strategy needs its backbone's targeted linears in.

    `method` selects a quantizer registered in `lorabench.backbone.quantize`
    (e.g. "bnb4bit", "intn"); `options` are that quantizer's keyword arguments.
    """

    method: str
    target_modules: Any = "all-linear"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Nominal bits of the quantized weights, used by the seed memory formula."""
        return float(self.options.get("bits", 4))


class Strategy(ABC):
    """Base class of every fine-tuning method (full, lora, qlora, qalora, relora, ...)."""

    name: ClassVar[str]
    config_class: ClassVar[type] = StrategyConfig

    def __init__(self, cfg: StrategyConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed

    # ---- backbone -------------------------------------------------------------------
    def base_format(self) -> Optional[BaseFormat]:
        """Quantization the backbone must get before `wrap`; None keeps it as loaded."""
        return None

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Freeze what is frozen, inject adapters; return the model to train."""

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Parameters the optimizer updates (default: everything with requires_grad)."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # ---- training hooks ---------------------------------------------------------------
    def lr_scale(self, step: int) -> float:
        """Factor on the scheduled lr for the update after `step` steps (e.g. a warm-start phase's own lr)."""
        return 1.0

    def rebuild_optimizer_at(self, step: int) -> bool:
        """True when the trainable set changes before `step` (e.g. after a warm start)."""
        return False

    def on_step_end(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        """Called after optimizer step `step` (1-based count of steps done); returns metrics to log."""
        return {}

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Metrics only known at the end of training (e.g. rank of the accumulated update)."""
        return {}

    # ---- merging ------------------------------------------------------------------------
    def merged_for_eval(self, model: nn.Module, out_dir: Path) -> Optional[nn.Module]:
        """The merged model to score as `eval/*_merged`, or None when the run asks for no merge."""
        return None

    def save_artifacts(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained result (adapter, merged weights) into the run dir."""

    # ---- memory --------------------------------------------------------------------------
    def formula_bytes(self, n_base: int, n_trainable: int) -> int:
        """The seed formula: 4N+16M over a 16/32-bit base, 0.5N+16M over a 4-bit one."""
        fmt = self.base_format()
        per_base = 4.0 if fmt is None else fmt.bits_per_weight / 8.0
        return int(per_base * n_base + 16 * n_trainable)

    # ---- checkpointing -------------------------------------------------------------------
    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """Everything needed to resume: by default the trainable tensors only."""
        return {"params": {n: p.detach().clone() for n, p in self.trainable_parameters(model)}}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (called after `wrap`)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["params"].items():
                params[n].copy_(t)
