"""ReLoRA (Lialin et al., ICLR 2024): high-rank training from a sequence of low-rank ones.

Every `reset_every` steps each adapter is merged into its base (W += (α/r)·B@A), A is
re-drawn and B zeroed (so the function is unchanged), and the adapters' AdamW moments are
pruned in place. The sum of K rank-r updates can reach rank K·r, which is the point of the
method; with `keep_factors` the merged factors are kept (counted in memory, written to their
own file, never to checkpoints) and `final_metrics` measures that rank. The layer is the LoRA layer with the ReLoRA
variant (`adapters/relora.py`); the optimizer reset is `training.optimizer.prune_moments`.
Where this differs from the official code, and why: docs/relora.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lorabench.adapters.lora import LoRALinear, inject_lora
from lorabench.adapters.relora import ReLoRAVariant, relora_layers
from lorabench.errors import ConfigError
from lorabench.quant import BaseFormat, bnb4bit
from lorabench.strategies.base import Strategy, StrategyConfig, check_rank_and_dropout
from lorabench.strategies.registry import register
from lorabench.surgery import find_target_linears
from lorabench.training.optimizer import RESET_MASKS, prune_moments
from lorabench.utils import DTYPES, atomic_torch_save

log = logging.getLogger(__name__)
FACTORS_FILE = "relora_factors.pt"  # in the run dir with keep_factors: every merged cycle's factors (analysis/relora_rank.py)


@dataclass
class ReLoRAConfig(StrategyConfig):
    name: str = "relora"  # registry name
    lr: float = 3e-3  # peak lr (the paper uses ≈2× the full-rank lr)
    rank: int = 8  # r of each low-rank cycle
    alpha: float = 16.0  # α: each cycle's update is scaled by α/r
    dropout: float = 0.0  # dropout on the adapter input only
    target_modules: Any = "all-linear"  # linears that get adapters; all-linear = attention + MLP in Llama (lm_head excluded)
    quantize_modules: Any = "all-linear"  # base=nf4: linears stored in 4 bits (the whole decoder, as QLoRA)
    reset_every: int = 50  # steps between merge-and-restart; also the lr restart period (optim.restart_every follows it)
    scheduler: str = "jagged_cosine"  # the lr schedule ReLoRA asks for (optim.scheduler defaults to it)
    restart_warmup_steps: int = 10  # lr re-warmup after each restart (optim.restart_warmup_steps defaults to it; jagged_cosine needs >= 1)
    min_lr_ratio: float = 0.1  # the cosine's floor as a fraction of the peak lr, the paper's 0.1 (optim.min_lr_ratio defaults to it)
    prune_ratio: float = 0.999  # fraction of the adapters' AdamW moment entries zeroed at each reset (official default 0.999)
    optimizer_reset: str = "random"  # random: a random mask (official default) | magnitude: prune the smallest entries
    reset_masks: str = "separate"  # separate: each moment its own mask (official code) | joint: one mask decided on exp_avg_sq zeroes both moments
    warm_start_steps: int = 0  # full-rank steps before the low-rank cycles, scheduled as a run of its own without restarts (0 = none; else a multiple of reset_every)
    warm_start_lr_ratio: float = 1.0  # lr of the warm start as a fraction of the peak (full-rank wants a lower lr than LoRA)
    train_full_rank: list[str] = field(default_factory=lambda: ["embed_tokens", "norm", "lm_head"])  # modules kept trainable full-rank (a name's last part ending with an entry matches)
    base: str = "fp32"  # fp32 | bf16: dtype of the adapted base weights | nf4: bitsandbytes 4-bit base
    master_copy: str = "auto"  # nf4: dtype of a float copy of each base weight that takes the merges and is requantized (fp32 | bf16 | fp16 | none); auto = fp32 over nf4, none over a float base
    keep_factors: bool = False  # keep every merged cycle's factors (4 B per adapter parameter per merge, counted) for the rank of the accumulated update and the 4-bit drift; written to relora_factors.pt, never into checkpoints
    double_quant: bool = True  # nf4 only: quantize the absmax constants too (8-bit, blocks of 256)
    blocksize: int = 64  # nf4 only: weights per absmax block
    compute_dtype: str = "bf16"  # nf4 only: dtype of the dequantized matmul

    base_choices = ("fp32", "bf16", "nf4")
    master_default = "fp32"  # what master_copy=auto means over nf4 (docs/relora.md#4-bit-base)
    reset_choices = ("magnitude", "random")
    mask_choices = RESET_MASKS

    def master_dtype(self) -> Optional[torch.dtype]:
        """The master copy's dtype over a 4-bit base, None when there is none."""
        if self.base != "nf4" or self.master_copy == "none":
            return None
        return DTYPES[self.master_default if self.master_copy == "auto" else self.master_copy]

    def validate(self) -> None:
        check_rank_and_dropout(self.rank, self.dropout)
        if self.reset_every <= 0:
            raise ConfigError(f"strategy.reset_every: must be a positive number of steps, got {self.reset_every}")
        if self.reset_every <= self.restart_warmup_steps:
            raise ConfigError(
                f"strategy.reset_every: must be greater than strategy.restart_warmup_steps={self.restart_warmup_steps}, "
                f"got {self.reset_every}"
            )
        if not 0.0 <= self.prune_ratio <= 1.0:
            raise ConfigError(f"strategy.prune_ratio: must be in [0, 1], got {self.prune_ratio}")
        if self.optimizer_reset not in self.reset_choices:
            raise ConfigError(
                f"strategy.optimizer_reset: expected one of {list(self.reset_choices)}, got '{self.optimizer_reset}'"
            )
        if self.reset_masks not in self.mask_choices:
            raise ConfigError(f"strategy.reset_masks: expected one of {list(self.mask_choices)}, got '{self.reset_masks}'")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"strategy.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.warm_start_lr_ratio <= 10.0:
            raise ConfigError(f"strategy.warm_start_lr_ratio: must be in (0, 10], got {self.warm_start_lr_ratio}")
        if self.warm_start_steps < 0:
            raise ConfigError(f"strategy.warm_start_steps: must be >= 0, got {self.warm_start_steps}")
        if self.warm_start_steps % self.reset_every != 0:
            below = self.warm_start_steps // self.reset_every * self.reset_every
            near = [v for v in (below, below + self.reset_every) if v > 0]
            raise ConfigError(
                f"strategy.warm_start_steps: {self.warm_start_steps} is not a multiple of strategy.reset_every="
                f"{self.reset_every}; merges fall on multiples of reset_every, so the low-rank phase after the warm "
                f"start must be whole cycles (e.g. {' or '.join(map(str, near))})"
            )
        if self.base not in self.base_choices:
            raise ConfigError(f"strategy.base: expected one of {list(self.base_choices)}, got '{self.base}'")
        if self.base == "nf4" and self.warm_start_steps > 0:
            raise ConfigError(
                "strategy.warm_start_steps: a 4-bit base cannot be trained full-rank; use base=fp32/bf16 or warm_start_steps=0"
            )
        if self.master_copy not in ("auto", "none", *DTYPES):
            raise ConfigError(
                f"strategy.master_copy: expected a float dtype ({' | '.join(DTYPES)}), auto or none, got '{self.master_copy}'"
            )
        if self.master_copy not in ("auto", "none") and self.base != "nf4":
            raise ConfigError(f"strategy.master_copy: only meaningful with base=nf4, got base={self.base}")
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"strategy.compute_dtype: expected one of {list(DTYPES)}, got '{self.compute_dtype}'")


@register
class ReLoRA(Strategy):
    """LoRA cycles merged into the base every `reset_every` steps, after an optional full-rank warm start."""

    name = "relora"
    config_class = ReLoRAConfig
    label_keys = {"rank": "r", "reset_every": "T"}

    def __init__(self, cfg: ReLoRAConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.merges = 0
        self.merge_error = 0.0  # Σ over merges and layers of ‖stored W − intended W‖_F
        self.merge_delta = 0.0  # Σ over merges and layers of ‖Δ‖_F (to report the error relatively)
        self.adapted: list[str] = []
        self.full_rank: list[str] = []
        self._warned_lr = False

    # ---- backbone -------------------------------------------------------------------------
    def base_format(self) -> Optional[BaseFormat]:
        c = self.cfg
        if c.base != "nf4":
            return None
        opts = {"quant_type": "nf4", "double_quant": c.double_quant, "blocksize": c.blocksize, "compute_dtype": c.compute_dtype}
        return BaseFormat("bnb4bit", c.quantize_modules, opts)

    def wrap(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        quantized = c.base == "nf4"
        if not quantized:  # the adapted bases in the dtype ReLoRA merges into
            for name in find_target_linears(model, c.target_modules):
                model.get_submodule(name).to(DTYPES[c.base])
        self.adapted = inject_lora(
            model, c.target_modules, c.rank, c.alpha, c.dropout,
            variant=lambda name, base: ReLoRAVariant(quantized, c.master_dtype(), c.keep_factors),
        )
        adapted = set(self.adapted)
        self.full_rank = [
            n for n, m in model.named_modules()
            if n and _matches(n, list(c.train_full_rank)) and not isinstance(m, LoRALinear)
            and not any(n == a or n.startswith(a + ".") for a in adapted)
        ]
        missing = [e for e in c.train_full_rank if not any(_matches(n, [e]) for n in self.full_rank)]
        if missing:
            raise ConfigError(f"strategy.train_full_rank: {missing} matched no module outside the adapted linears")
        self.apply_phase(model, 0)
        return model

    def _adapter_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for _, layer in relora_layers(model) for p in (layer.lora_A.weight, layer.lora_B.weight)]

    # ---- phases: an optional full-rank warm start, then low-rank cycles --------------------
    def phase_starts(self) -> list[int]:
        return [0, self.cfg.warm_start_steps] if self.cfg.warm_start_steps > 0 else [0]

    def apply_phase(self, model: nn.Module, step: int) -> None:
        """Warm start: everything but the adapters trains; low-rank: adapters + `train_full_rank`."""
        low_rank = step >= self.cfg.warm_start_steps
        for p in model.parameters():
            p.requires_grad_(not low_rank)
        for p in self._adapter_params(model):
            p.requires_grad_(low_rank)
        if low_rank:
            for n in self.full_rank:
                for p in model.get_submodule(n).parameters():
                    p.requires_grad_(True)

    # ---- training hooks -------------------------------------------------------------------
    def lr_scale(self, step: int) -> float:
        """The warm start's own lr: `warm_start_lr_ratio` × the scheduled lr while full-rank."""
        return self.cfg.warm_start_lr_ratio if step < self.cfg.warm_start_steps else 1.0

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Merge-and-restart every `reset_every` steps of the low-rank phase.

        Returns metrics only at a merge (the trainer logs every step that returns some).
        """
        c = self.cfg
        if step <= c.warm_start_steps or step % c.reset_every != 0:
            return {}
        self.merges += 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.merges)
        err = delta = 0.0
        layers = relora_layers(model)
        for _, layer in layers:
            e, d = layer.variant.merge_and_restart(layer, gen)
            err, delta = err + e, delta + d
        self.merge_error += err
        self.merge_delta += delta
        if self.cfg.base == "nf4":  # new Linear4bit layers: let memory accounting count the shared code table once
            bnb4bit.share_nested_code([layer.base_layer for _, layer in layers])
        out: dict[str, float] = {"relora/merges": float(self.merges)}
        out["relora/pruned_fraction"] = prune_moments(
            optimizer, self._adapter_params(model), c.prune_ratio, c.optimizer_reset, gen, c.reset_masks
        )
        out["relora/merge_error"] = self.merge_error
        out["relora/merge_error_rel"] = self.merge_error / self.merge_delta if self.merge_delta else 0.0
        # The lr of the next update (the trainer steps the schedule before this hook): 0 at a trough.
        lr_next = float(optimizer.param_groups[0]["lr"])
        out["relora/lr_after_merge"] = lr_next
        if lr_next > 0 and not self._warned_lr:
            self._warned_lr = True
            log.warning(
                "relora: merge at step %d is not at an lr trough (next lr %.3g); use "
                "optim.scheduler=jagged_cosine (its restarts follow strategy.reset_every)", step, lr_next,
            )
        return out

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Merge error; with keep_factors, the rank of each adapted layer's accumulated update
        (vs r) and, over nf4, the 4-bit drift. Without the factors those are absent: the
        accumulated update is not held anywhere else (docs/relora.md#what-is-measured-and-logged)."""
        layers = relora_layers(model)
        out: dict[str, float] = {"relora/rank": float(self.cfg.rank), "relora/merges": float(self.merges)}
        out["relora/merge_error"] = self.merge_error
        out["relora/merge_error_rel"] = self.merge_error / self.merge_delta if self.merge_delta else 0.0
        if not self.factors_complete(model):
            return out
        ranks = {name: layer.variant.accumulated_update_rank(layer) for name, layer in layers}
        out.update({f"relora/update_rank/{n}": float(v) for n, v in ranks.items()})
        if ranks:
            vals = list(ranks.values())
            out["relora/update_rank_mean"] = sum(vals) / len(vals)
            out["relora/update_rank_min"] = float(min(vals))
            out["relora/update_rank_max"] = float(max(vals))
        if self.cfg.base == "nf4":
            drift = total = 0.0
            for _, layer in layers:
                d, t = layer.variant.requant_drift(layer)
                drift, total = drift + d**2, total + t**2
            out["relora/requant_drift"] = math.sqrt(drift)  # ‖W_now − W_start − ΣΔ‖ over all adapted layers
            out["relora/requant_drift_rel"] = math.sqrt(drift / total) if total else 0.0
        return out

    def factors_complete(self, model: nn.Module) -> bool:
        """keep_factors is on and the layers hold the factors of every merge of this run (a run
        resumed after a merge does not: checkpoints never hold factors)."""
        if not self.cfg.keep_factors:
            return False
        layers = relora_layers(model)
        return all(len(l.variant.merged_factors(l)) == self.merges for _, l in layers)

    # The seed formula is the base class's, one rule for every strategy: 4N + 16M over a
    # 16/32-bit base (bf16 included), 0.5N + 16M over nf4. A bf16 base, a master copy and kept
    # factors show up in the expected and measured bytes, not in the formula.

    # ---- checkpointing and artifacts ---------------------------------------------------------
    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """Trainable tensors, plus what merges changed: the adapted bases (and master copies)
        and counters; resuming mid-cycle then equals no break. Its size does not depend on the
        number of merges (the factors go to their own file, `save_artifacts`)."""
        layers = dict(relora_layers(model))
        return {
            "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "adapters": {n: {"A": l.lora_A.weight.detach().clone(), "B": l.lora_B.weight.detach().clone()} for n, l in layers.items()},
            "base": {n: l.variant.base_state(l) for n, l in layers.items()},
            "master": {n: l.master.clone() for n, l in layers.items() if l.master is not None},
            "merges": self.merges,
            "merge_error": self.merge_error,
            "merge_delta": self.merge_delta,
        }

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore `state_dict` after `wrap` and `apply_phase`. Kept factors are not in it: after
        a resume past a merge the rank and drift metrics are absent (`factors_complete`)."""
        self.merges = int(state["merges"])
        self.merge_error = float(state["merge_error"])
        self.merge_delta = float(state["merge_delta"])
        with torch.no_grad():
            for n, layer in relora_layers(model):
                layer.variant.load_base_state(layer, state["base"][n])
                layer.lora_A.weight.copy_(state["adapters"][n]["A"])
                layer.lora_B.weight.copy_(state["adapters"][n]["B"])
                if n in state["master"]:
                    layer.master = state["master"][n].clone()
                layer.variant.set_merged_factors(layer, [])
            params = dict(model.named_parameters())
            for n, t in state["params"].items():
                params[n].copy_(t)
        if self.cfg.keep_factors and self.merges:
            log.warning("relora: resumed after %d merges; their factors are not in checkpoints, so "
                        "relora/update_rank and relora/requant_drift will be absent", self.merges)

    def factors_state(self, model: nn.Module) -> dict[str, Any]:
        """What `FACTORS_FILE` holds: per adapted layer the merged (B_k, s·A_k), the current
        cycle's B and A with its scaling s, and (nf4) the starting 4-bit weight."""
        layers = relora_layers(model)
        return {
            "merges": self.merges,
            "factors": {n: [(u.clone(), v.clone()) for u, v in l.variant.merged_factors(l)] for n, l in layers},
            "adapters": {n: {"A": l.lora_A.weight.detach().float().cpu().clone(), "B": l.lora_B.weight.detach().float().cpu().clone(),
                             "scaling": float(l.scaling)} for n, l in layers},
            "initial": {n: init for n, l in layers if (init := l.variant.initial_state(l)) is not None},
        }

    def save_artifacts(self, model: nn.Module, out_dir: Path) -> None:
        """final_state.pt, and with keep_factors `relora_factors.pt` (written only when it
        holds every merge of the run)."""
        super().save_artifacts(model, out_dir)
        if self.factors_complete(model):
            atomic_torch_save(self.factors_state(model), Path(out_dir) / FACTORS_FILE)
        elif self.cfg.keep_factors:
            log.warning("relora: %s not written: the factors of merges before the resume are gone", FACTORS_FILE)


def _matches(name: str, entries: list[str]) -> bool:
    """A module name matches an entry when its last part equals or ends with it ('norm' ⊂ 'input_layernorm')."""
    last = name.rsplit(".", 1)[-1]
    return any(last == e or last.endswith(e) for e in entries)
