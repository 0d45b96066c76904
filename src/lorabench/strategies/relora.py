"""ReLoRA (Lialin et al., ICLR 2024): high-rank training from a sequence of low-rank ones.

Every `reset_every` steps each adapter is merged into its base (W += (α/r)·B@A), A is
re-drawn and B zeroed (so the function is unchanged), and the adapters' AdamW moments are
pruned in place. The sum of K rank-r updates can reach rank K·r, which is the point of
the method; `final_metrics` measures that rank. Pair it with `optim.scheduler=jagged_cosine`
and `optim.restart_every` equal to `reset_every`, so that every merge falls at the trough.

Faithfulness notes (DESIGN.md §3, §6):
- A starts non-zero (kaiming), unlike the official repo's A=B=0 start where nothing learns
  until the first merge.
- exp_avg and exp_avg_sq are pruned with ONE mask decided on exp_avg_sq: pruning them
  separately keeps some m whose v is zero and the next update is ≈ lr·m/eps (divergence).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from lorabench.adapters.lora import LoRALinear, lora_layers
from lorabench.adapters.targets import find_target_linears, replace_module
from lorabench.errors import ConfigError
from lorabench.strategies.base import BaseFormat, Strategy, StrategyConfig, check_rank_and_dropout
from lorabench.strategies.registry import register
from lorabench.utils import DTYPES

log = logging.getLogger(__name__)


@dataclass
class ReLoRAConfig(StrategyConfig):
    name: str = "relora"  # registry name
    lr: float = 3e-3  # peak lr (the paper uses ≈2× the full-rank lr)
    rank: int = 8  # r of each low-rank cycle
    alpha: float = 16.0  # α: each cycle's update is scaled by α/r
    dropout: float = 0.0  # dropout on the adapter input only
    target_modules: Any = "all-linear"  # linears that get adapters; all-linear = attention + MLP in Llama (lm_head excluded)
    reset_every: int = 50  # steps between merge-and-restart (optim.restart_every defaults to it)
    scheduler: str = "jagged_cosine"  # the lr schedule ReLoRA asks for (optim.scheduler defaults to it)
    restart_warmup_steps: int = 10  # lr re-warmup after each restart (optim.restart_warmup_steps defaults to it; 0 = no jagged schedule asked)
    prune_ratio: float = 0.99  # fraction of the adapters' AdamW moment entries zeroed at each reset
    optimizer_reset: str = "magnitude"  # magnitude: prune the smallest exp_avg_sq entries | random: a random mask
    warm_start_steps: int = 0  # full-rank steps before the low-rank cycles (0 = none)
    warm_start_lr_ratio: float = 1.0  # lr of the warm start as a fraction of the peak (full-rank wants a lower lr than LoRA)
    train_full_rank: list[str] = field(default_factory=lambda: ["embed_tokens", "norm", "lm_head"])  # modules kept trainable full-rank (a name's last part ending with an entry matches)
    base: str = "fp32"  # fp32 | bf16: dtype of the adapted base weights | nf4: bitsandbytes 4-bit base
    master_copy: bool = False  # nf4 only: keep a 16-bit copy of each base weight, merge into it, requantize from it
    double_quant: bool = True  # nf4 only: quantize the absmax constants too (8-bit, blocks of 256)
    blocksize: int = 64  # nf4 only: weights per absmax block
    compute_dtype: str = "bf16"  # nf4 only: dtype of the dequantized matmul

    base_choices = ("fp32", "bf16", "nf4")
    reset_choices = ("magnitude", "random")

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
        if not 0.0 < self.warm_start_lr_ratio <= 10.0:
            raise ConfigError(f"strategy.warm_start_lr_ratio: must be in (0, 10], got {self.warm_start_lr_ratio}")
        if self.warm_start_steps < 0:
            raise ConfigError(f"strategy.warm_start_steps: must be >= 0, got {self.warm_start_steps}")
        if self.base not in self.base_choices:
            raise ConfigError(f"strategy.base: expected one of {list(self.base_choices)}, got '{self.base}'")
        if self.base == "nf4" and self.warm_start_steps > 0:
            raise ConfigError(
                "strategy.warm_start_steps: a 4-bit base cannot be trained full-rank; use base=fp32/bf16 or warm_start_steps=0"
            )
        if self.master_copy and self.base != "nf4":
            raise ConfigError(f"strategy.master_copy: only meaningful with base=nf4, got base={self.base}")
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"strategy.compute_dtype: expected one of {list(DTYPES)}, got '{self.compute_dtype}'")


def _bnb4bit():
    """The shared 4-bit backbone module (imported lazily: only base=nf4 needs bitsandbytes)."""
    from lorabench.backbone import bnb4bit

    return bnb4bit


class ReLoRALinear(LoRALinear):
    """A LoRA layer that can fold its update into the base and start a new cycle.

    The base may be a float linear of any dtype (inputs are cast to it) or a 4-bit
    bitsandbytes linear, merged by dequantize → add → requantize (optionally from a
    16-bit master copy held as a buffer, so memory accounting sees it).
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float, quantized: bool) -> None:
        super().__init__(base_layer, rank, alpha, dropout)
        self.quantized = quantized
        # nf4 + master_copy: a bf16 copy of the base (a buffer, so memory accounting counts it).
        self.register_buffer("master", None, persistent=False)
        # Scaled factors of every merged cycle: W_now − W_cycle0 = Σ_k U_k @ V_k (kept on CPU, tiny).
        self.merged_factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.initial_state: Optional[dict[str, Any]] = None  # 4-bit base at wrap time (nf4 only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self.base_layer, "weight", None)
        if self.quantized or w is None or w.dtype == x.dtype:
            result = self.base_layer(x)
        else:
            result = self.base_layer(x.to(w.dtype)).to(x.dtype)
        if self.merged:  # LoRALinear.merge() (export) already folded B@A into the base
            return result
        a_in = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        update = self.lora_B(self.lora_A(a_in)) * self.scaling
        return result + update.to(result.dtype)

    # ---- base weight access --------------------------------------------------------------
    def base_weight_float(self) -> torch.Tensor:
        """The base weight as the model uses it, in fp32."""
        if self.quantized:
            return _bnb4bit().dequantized_weight(self.base_layer, torch.float32)
        return self.base_layer.weight.detach().float()

    def enable_master_copy(self) -> None:
        """Hold a 16-bit copy of the dequantized base to merge into (nf4 + master_copy)."""
        self.master = self.base_weight_float().to(torch.bfloat16)

    @torch.no_grad()
    def merge_and_restart(self, generator: torch.Generator) -> tuple[float, float]:
        """W += Δ = (α/r)·B@A, A re-drawn (kaiming), B = 0.

        Returns (‖realized change of the stored W − Δ‖_F, ‖Δ‖_F): the first is 0 for an fp32
        base, bf16 rounding for a bf16 one, and 4-bit rounding for nf4.
        """
        delta = self.delta_weight()
        if self.quantized:
            before = self.base_weight_float()
            if self.master is not None:  # merge into the 16-bit copy, quantize from it
                self.master.copy_((self.master.float() + delta).to(self.master.dtype))
                self._requantize(self.master.float())
            else:  # dequantize, add, requantize
                self._requantize(before + delta)
            # how far this merge's realized change of the 4-bit weight is from Δ
            err = (self.base_weight_float() - before - delta).norm().item()
        else:
            w = self.base_layer.weight
            intended = w.float() + delta
            w.copy_(intended.to(w.dtype))
            err = (w.float() - intended).norm().item()
        self.merged_factors.append(
            (self.lora_B.weight.detach().float().cpu().clone(), (self.lora_A.weight.detach().float() * self.scaling).cpu())
        )
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        return err, delta.norm().item()

    def _requantize(self, weight: torch.Tensor) -> None:
        """Replace the 4-bit base by `weight` quantized in the same format (bias kept)."""
        bnb4 = _bnb4bit()
        old = self.base_layer
        dtype = old.weight.quant_state.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=old.bias is not None, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if old.bias is not None:
            lin.bias = old.bias
        self.base_layer = bnb4.requantize(lin, old)

    def quantized_state(self) -> dict[str, Any]:
        """The 4-bit base as plain tensors (packed weight, packed quant_state, bias): exact, and
        loadable with torch.load(weights_only=True)."""
        bnb4 = _bnb4bit()
        data, qs = bnb4._unpacked_state(self.base_layer)
        bias = self.base_layer.bias
        return {
            "data": data.detach().clone(),
            "stats": {k: v.clone() for k, v in qs.as_dict(packed=True).items()},
            "bias": None if bias is None else bias.detach().clone(),
        }

    def load_quantized_state(self, state: dict[str, Any]) -> None:
        """Rebuild the 4-bit base bit for bit from `quantized_state`."""
        self.base_layer = self._linear4bit_from_state(state)

    def _linear4bit_from_state(self, state: dict[str, Any]) -> nn.Module:
        import bitsandbytes as bnb

        old = self.base_layer
        device = state["data"].device
        qs = old.weight.quant_state
        new = bnb.nn.Linear4bit(
            self.in_features, self.out_features, bias=state["bias"] is not None,
            compute_dtype=old.compute_dtype, compress_statistics=bool(qs.nested), quant_type=qs.quant_type, device="meta",
        )
        new.weight = bnb.nn.Params4bit.from_prequantized(
            data=state["data"], quantized_stats=state["stats"], requires_grad=False, device=device, module=new
        )
        if state["bias"] is not None:
            new.bias = nn.Parameter(state["bias"].clone(), requires_grad=False)
        new.support_avx512bf16_for_cpu = False  # DESIGN.md §6: never repack for CPU inference
        return new

    def requant_drift(self) -> tuple[float, float]:
        """(‖W_now − W_start − Σ merged Δ‖_F, ‖Σ merged Δ‖_F) for a 4-bit base, all dequantized.

        The error that rounding to the 4-bit grid at every merge has accumulated: it grows
        with the merges when merging by dequantize-add-requantize, and stays one quantization
        step away when requantizing from a master copy.
        """
        if not self.merged_factors:
            return 0.0, 0.0
        start = _bnb4bit().dequantized_weight(self._linear4bit_from_state(self.initial_state), torch.float32)
        now = self.base_weight_float().cpu()
        u = torch.cat([u for u, _ in self.merged_factors], dim=1)
        v = torch.cat([v for _, v in self.merged_factors], dim=0)
        applied = u @ v
        return (now - start.cpu() - applied).norm().item(), applied.norm().item()

    def accumulated_update_rank(self) -> int:
        """Numerical rank (at fp32 precision) of Σ merged (α/r)·B_k@A_k + the current (α/r)·B@A.

        Computed from the factors: with U = [B_1 … B_K B] and V = [s·A_1; …; s·A_K; s·A],
        the singular values of U@V are those of R_u @ R_vᵀ (QR of U and Vᵀ), a small matrix.
        """
        us = [u for u, _ in self.merged_factors] + [self.lora_B.weight.detach().float().cpu()]
        vs = [v for _, v in self.merged_factors] + [(self.lora_A.weight.detach().float() * self.scaling).cpu()]
        u = torch.cat(us, dim=1).double()
        v = torch.cat(vs, dim=0).double()
        _, ru = torch.linalg.qr(u)
        _, rv = torch.linalg.qr(v.T)
        s = torch.linalg.svdvals(ru @ rv.T)
        if s.numel() == 0 or s[0] == 0:
            return 0
        tol = s[0] * max(self.out_features, self.in_features) * torch.finfo(torch.float32).eps
        return int((s > tol).sum())


def _to_cpu(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _matches(name: str, entries: list[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(last == e or last.endswith(e) for e in entries)


@torch.no_grad()
def prune_moments(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    ratio: float,
    method: str,
    generator: Optional[torch.Generator] = None,
) -> float:
    """Zero `ratio` of each param's exp_avg and exp_avg_sq entries with ONE mask decided on
    exp_avg_sq (smallest magnitudes, or at random), in place; the step counter is untouched.
    Returns the fraction of entries zeroed over all pruned tensors."""
    zeroed = total = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            continue
        v, m = state["exp_avg_sq"], state["exp_avg"]
        n = v.numel()
        k = int(round(ratio * n))
        if method == "magnitude":
            keep = torch.zeros(n, dtype=torch.bool, device=v.device)
            if n - k > 0:
                keep[torch.topk(v.abs().flatten(), n - k, sorted=False).indices] = True
        else:
            keep = torch.ones(n, dtype=torch.bool, device=v.device)
            if k > 0:
                perm = torch.randperm(n, generator=generator, device="cpu").to(v.device)
                keep[perm[:k]] = False
        keep = keep.view_as(v)
        v.mul_(keep)
        m.mul_(keep)
        zeroed += int((~keep).sum())
        total += n
    return zeroed / total if total else 0.0


@register
class ReLoRA(Strategy):
    """LoRA cycles merged into the base every `reset_every` steps, after an optional full-rank warm start."""

    name = "relora"
    config_class = ReLoRAConfig

    def __init__(self, cfg: ReLoRAConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.merges = 0
        self.low_rank = cfg.warm_start_steps == 0
        self.merge_error = 0.0  # Σ over merges and layers of ‖stored W − intended W‖_F
        self.merge_delta = 0.0  # Σ over merges and layers of ‖Δ‖_F (to report the error relatively)
        self.adapted: list[str] = []
        self.full_rank: list[str] = []
        self._switch_pending = False  # warm start over: switch the trainable set at the next rebuild
        self._warned_lr = False

    # ---- backbone -------------------------------------------------------------------------
    def base_format(self) -> Optional[BaseFormat]:
        c = self.cfg
        if c.base != "nf4":
            return None
        opts = {"quant_type": "nf4", "double_quant": c.double_quant, "blocksize": c.blocksize, "compute_dtype": c.compute_dtype}
        return BaseFormat("bnb4bit", c.target_modules, opts)

    def wrap(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapted = find_target_linears(model, c.target_modules)
        quantized = c.base == "nf4"
        for name in self.adapted:
            base = model.get_submodule(name)
            if not quantized:
                base.to(DTYPES[c.base])
            layer = ReLoRALinear(base, c.rank, c.alpha, c.dropout, quantized)
            if quantized:
                # the starting 4-bit weight (on CPU, 0.5 B/param) to measure the accumulated requantization drift
                layer.initial_state = {k: _to_cpu(v) for k, v in layer.quantized_state().items()}
                if c.master_copy:
                    layer.enable_master_copy()
            replace_module(model, name, layer)
        adapted = set(self.adapted)
        self.full_rank = [
            n for n, m in model.named_modules()
            if n and _matches(n, list(c.train_full_rank)) and not isinstance(m, LoRALinear)
            and not any(n == a or n.startswith(a + ".") for a in adapted)
        ]
        missing = [e for e in c.train_full_rank if not any(_matches(n, [e]) for n in self.full_rank)]
        if missing:
            raise ConfigError(f"strategy.train_full_rank: {missing} matched no module outside the adapted linears")
        self._apply_phase(model)
        return model

    def _adapter_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for _, layer in lora_layers(model) for p in (layer.lora_A.weight, layer.lora_B.weight)]

    def _apply_phase(self, model: nn.Module) -> None:
        """Warm start: everything but the adapters trains; low-rank: adapters + `train_full_rank`."""
        for p in model.parameters():
            p.requires_grad_(not self.low_rank)
        for p in self._adapter_params(model):
            p.requires_grad_(self.low_rank)
        if self.low_rank:
            for n in self.full_rank:
                for p in model.get_submodule(n).parameters():
                    p.requires_grad_(True)

    # ---- training hooks -------------------------------------------------------------------
    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Warm start: every parameter but the adapters; then adapters + `train_full_rank`.

        The switch happens on the first call after `rebuild_optimizer_at` said so, i.e. when
        the trainer rebuilds AdamW, so the set and the optimizer always change together.
        """
        if self._switch_pending:
            self._switch_pending = False
            self.low_rank = True
            self._apply_phase(model)
        return super().trainable_parameters(model)

    def lr_scale(self, step: int) -> float:
        """The warm start's own lr: `warm_start_lr_ratio` × the scheduled lr while full-rank."""
        return self.cfg.warm_start_lr_ratio if step < self.cfg.warm_start_steps else 1.0

    def rebuild_optimizer_at(self, step: int) -> bool:
        """True once, before the first low-rank step (`step` = steps done so far)."""
        if self.cfg.warm_start_steps > 0 and step == self.cfg.warm_start_steps and not self.low_rank:
            self._switch_pending = True
            return True
        return False

    def on_step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Merge-and-restart every `reset_every` steps of the low-rank phase.

        Returns metrics only at a merge (the trainer logs every step that returns some).
        """
        c = self.cfg
        if not self.low_rank or step <= c.warm_start_steps or step % c.reset_every != 0:
            return {}
        self.merges += 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.merges)
        err = delta = 0.0
        for _, layer in lora_layers(model):
            e, d = layer.merge_and_restart(gen)
            err, delta = err + e, delta + d
        self.merge_error += err
        self.merge_delta += delta
        if self.cfg.base == "nf4":  # new Linear4bit layers: let memory accounting count the shared code table once
            _bnb4bit()._mark_shared_nested_code([l.base_layer for _, l in lora_layers(model)])
        out: dict[str, float] = {"relora/merges": float(self.merges)}
        out["relora/pruned_fraction"] = prune_moments(
            optimizer, self._adapter_params(model), c.prune_ratio, c.optimizer_reset, gen
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
                "optim.scheduler=jagged_cosine optim.restart_every=%d", step, lr_next, c.reset_every,
            )
        return out

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Rank of each adapted layer's accumulated low-rank update, vs r; merge error."""
        ranks = {}
        for name, layer in lora_layers(model):
            if isinstance(layer, ReLoRALinear):
                ranks[name] = layer.accumulated_update_rank()
        out: dict[str, float] = {f"relora/update_rank/{n}": float(v) for n, v in ranks.items()}
        if ranks:
            vals = list(ranks.values())
            out["relora/update_rank_mean"] = sum(vals) / len(vals)
            out["relora/update_rank_min"] = float(min(vals))
            out["relora/update_rank_max"] = float(max(vals))
        out["relora/rank"] = float(self.cfg.rank)
        out["relora/merges"] = float(self.merges)
        if self.cfg.base == "nf4":
            drift = total = 0.0
            for _, layer in lora_layers(model):
                d, t = layer.requant_drift()
                drift, total = drift + d**2, total + t**2
            out["relora/requant_drift"] = math.sqrt(drift)  # ‖W_now − W_start − ΣΔ‖ over all adapted layers
            out["relora/requant_drift_rel"] = math.sqrt(drift / total) if total else 0.0
        out["relora/merge_error"] = self.merge_error
        out["relora/merge_error_rel"] = self.merge_error / self.merge_delta if self.merge_delta else 0.0
        return out

    # ---- memory ---------------------------------------------------------------------------
    def formula_bytes(self, n_base: int, n_trainable: int) -> int:
        """The seed formula: 4N (fp32) / 2N (bf16) / 0.5N (nf4) + 16M; a master copy's 2N
        shows up in the expected and measured bytes (it is a buffer), not here."""
        per_base = {"fp32": 4.0, "bf16": 2.0, "nf4": 0.5}[self.cfg.base]
        return int(per_base * n_base + 16 * n_trainable)

    # ---- checkpointing -------------------------------------------------------------------
    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """Trainable tensors, plus what merges changed: the adapted bases (and master copies),
        the merged factors, counters and the phase; resuming mid-cycle then equals no break."""
        layers = dict(lora_layers(model))
        base: dict[str, Any] = {}
        for n, layer in layers.items():
            if layer.quantized:
                base[n] = layer.quantized_state()
            else:
                base[n] = layer.base_layer.state_dict()
        return {
            "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "adapters": {n: {"A": l.lora_A.weight.detach().clone(), "B": l.lora_B.weight.detach().clone()} for n, l in layers.items()},
            "base": base,
            "master": {n: l.master.clone() for n, l in layers.items() if l.master is not None},
            "initial": {n: l.initial_state for n, l in layers.items() if l.quantized},
            "factors": {n: [(u.clone(), v.clone()) for u, v in l.merged_factors] for n, l in layers.items()},
            "merges": self.merges,
            "low_rank": self.low_rank,
            "merge_error": self.merge_error,
            "merge_delta": self.merge_delta,
        }

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore `state_dict` after `wrap`; also restores the phase (so rebuild the optimizer after)."""
        self.merges = int(state["merges"])
        self.merge_error = float(state["merge_error"])
        self.merge_delta = float(state["merge_delta"])
        self.low_rank = bool(state["low_rank"])
        self._apply_phase(model)
        layers = dict(lora_layers(model))
        with torch.no_grad():
            for n, layer in layers.items():
                if layer.quantized:
                    layer.load_quantized_state(state["base"][n])
                else:
                    layer.base_layer.load_state_dict(state["base"][n])
                layer.lora_A.weight.copy_(state["adapters"][n]["A"])
                layer.lora_B.weight.copy_(state["adapters"][n]["B"])
                if n in state.get("initial", {}):
                    layer.initial_state = state["initial"][n]
                if n in state["master"]:
                    layer.master = state["master"][n].clone()
                layer.merged_factors = [(u.clone(), v.clone()) for u, v in state["factors"][n]]
            params = dict(model.named_parameters())
            for n, t in state["params"].items():
                params[n].copy_(t)
