"""The strategy interface: everything the trainer may ask of a fine-tuning method.

A strategy sees only its own config node (a validated dataclass instance). The trainer
never branches on a strategy's name; it only calls these hooks, so adding a method is one
file in `strategies/` (a `Strategy` subclass with its config dataclass, `@register`ed)
plus one YAML in `conf/strategy/` holding only its deviations from the dataclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.quant import BaseFormat
from lorabench.utils import atomic_torch_save, module_device

FINAL_STATE = "final_state.pt"  # in the run dir: the strategy's state after the last step

__all__ = ["BaseFormat", "Strategy", "StrategyConfig", "check_rank_and_dropout"]


@dataclass
class StrategyConfig:
    """Keys every strategy node has; each strategy extends this dataclass with its own."""

    name: str = "???"  # registry name of the strategy
    lr: float = 1e-3  # learning rate tuned for this strategy on the default task; optim.lr defaults to it


def check_rank_and_dropout(rank: int, dropout: float) -> None:
    """The checks every low-rank adapter config shares (one-line errors naming the key)."""
    if rank <= 0:
        raise ConfigError(f"strategy.rank: must be a positive integer, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"strategy.dropout: must be in [0, 1), got {dropout}")


class Strategy(ABC):
    """Base class of every fine-tuning method (full, lora, qlora, qalora, relora, ...)."""

    name: ClassVar[str]
    config_class: ClassVar[type] = StrategyConfig
    # Config keys that tell runs of this strategy apart at a glance: each gives a W&B tag
    # `key:value` and a run-name part `<prefix><value>` (e.g. {"rank": "r"} → "rank:8", "r8").
    label_keys: ClassVar[dict[str, str]] = {}
    # Config values under which `merged_for_eval` returns a model equal to the unmerged one
    # (up to the base's float rounding); empty when the strategy has no such merge.
    lossless_merge: ClassVar[dict[str, Any]] = {}
    # Whether one run may train under torchrun/DDP (every built-in strategy can: DDP covers the
    # trainable set of each phase and all ranks apply the same hooks); False is refused in one line.
    supports_distributed: ClassVar[bool] = True

    def __init__(self, cfg: StrategyConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed

    # ---- what identifies a run ----------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Every key of this strategy's config (the summary's `strategy/<key>` columns, which
        analysis groups by)."""
        return {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg) if f.name != "name"}

    def tags(self) -> list[str]:
        """W&B tags of the run, from `label_keys`."""
        return [f"{k}:{getattr(self.cfg, k)}" for k in self.label_keys]

    def run_name(self, seed: int) -> str:
        """e.g. `lora-r8-seed0`: readable in a W&B table."""
        parts = [f"{prefix}{getattr(self.cfg, k)}" for k, prefix in self.label_keys.items()]
        return "-".join([self.cfg.name, *parts, f"seed{seed}"])

    # ---- backbone -------------------------------------------------------------------------------
    def base_format(self) -> Optional[BaseFormat]:
        """Quantization the backbone must get before `wrap`; None keeps it as loaded."""
        return None

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Freeze what is frozen, inject adapters; return the model to train (in phase 0)."""

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Parameters the optimizer updates: everything with requires_grad (a pure getter)."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # ---- phases: when the trainable set changes -----------------------------------------------
    def phase_starts(self) -> list[int]:
        """Steps (counts of steps done) at which a new phase with another trainable set begins.

        At each, the trainer calls `apply_phase` and then builds a new optimizer and schedule
        over the new trainable set (the only path by which the optimizer is rebuilt).
        """
        return [0]

    def apply_phase(self, model: nn.Module, step: int) -> None:
        """Set requires_grad for the phase that contains `step` (also used on resume)."""

    # ---- training hooks -------------------------------------------------------------------------
    def lr_scale(self, step: int) -> float:
        """Factor on the scheduled lr for the update after `step` steps (e.g. a warm-start phase's own lr)."""
        return 1.0

    def on_step_end(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        """Called after optimizer step `step` (1-based count of steps done); returns metrics to log."""
        return {}

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Metrics only known at the end of training (e.g. rank of the accumulated update)."""
        return {}

    # ---- merging ----------------------------------------------------------------------------------
    def merged_for_eval(self, model: nn.Module, out_dir: Path) -> Optional[nn.Module]:
        """The merged model to score as `eval/*_merged`, or None when the run asks for no merge."""
        return None

    def save_artifacts(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained result into the run dir: `final_state.pt` (what `state_dict`
        holds, exact for every strategy); subclasses add their adapter or merged files."""
        atomic_torch_save(self.state_dict(model), Path(out_dir) / FINAL_STATE)

    def load_artifacts(self, model: nn.Module, out_dir: Path) -> None:
        """Put a finished run's result into a freshly wrapped `model` (to score it without training)."""
        path = Path(out_dir) / FINAL_STATE
        if not path.exists():
            raise ConfigError(f"run_dir: {path} does not exist (the run did not complete)")
        self.apply_phase(model, 10**12)  # the phase a finished run ends in
        self.load_state_dict(model, torch.load(path, map_location=module_device(model), weights_only=True))

    # ---- memory -----------------------------------------------------------------------------------
    def formula_bytes(self, n_base: int, n_trainable: int) -> int:
        """The seed formula: 4N+16M over a 16/32-bit base, (bits/8)·N+16M over a quantized one."""
        fmt = self.base_format()
        per_base = 4.0 if fmt is None else fmt.bits_per_weight / 8.0
        return int(per_base * n_base + 16 * n_trainable)

    # ---- checkpointing ----------------------------------------------------------------------------
    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """Everything needed to resume: by default the trainable tensors only."""
        return {"params": {n: p.detach().clone() for n, p in self.trainable_parameters(model)}}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (called after `wrap` and `apply_phase`)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["params"].items():
                params[n].copy_(t)
