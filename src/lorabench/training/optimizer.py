"""AdamW over a strategy's trainable set, its lr schedule, and in-place optimizer-state surgery.

`prune_moments` is ReLoRA's optimizer reset (docs/relora.md#optimizer-reset), with one mask for
both moments or, as the official code, one per moment; it lives here, beside the optimizer whose
state it edits, so strategies never reach into AdamW's internals.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.training.schedules import build_schedule


PAGED = {"paged_adamw_32bit": "PagedAdamW32bit", "paged_adamw_8bit": "PagedAdamW8bit"}  # optim.name -> bitsandbytes class
OPTIMIZERS = ("adamw", *PAGED)  # the values optim.name accepts


def build_optimizer(optim_cfg: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over exactly `params` with the `optim.*` settings (torch's, or bitsandbytes' paged
    AdamW on CUDA: its state lives in unified memory that pages to the CPU under pressure)."""
    o = optim_cfg
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    name = o.get("name", "adamw")
    if name in PAGED:
        if any(p.device.type != "cuda" for p in params):
            raise ConfigError(f"optim.name: {name} (bitsandbytes paged AdamW) needs CUDA; use optim=adamw on this device")
        import bitsandbytes.optim as bnb_optim

        return getattr(bnb_optim, PAGED[name])(params, **kw)
    return torch.optim.AdamW(params, **kw)


def build_scheduler(
    optim_cfg: Any, total_steps: int, optimizer: torch.optim.Optimizer, start_step: int = 0,
    scale: Callable[[int], float] = lambda step: 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured schedule times `scale`, for an optimizer created after `start_step` steps.

    LambdaLR counts from 0 at creation, so the multiplier of its k-th step is that of the
    run's step `start_step + k`: an optimizer rebuilt mid-run continues the schedule where
    the run is, with no patching of the scheduler's counters.
    """
    schedule = build_schedule(optim_cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: schedule(start_step + k) * scale(start_step + k)
    )


RESET_MASKS = ("joint", "separate")  # joint: one mask for both moments (default) | separate: one per moment (official code)
MOMENTS = ("exp_avg", "exp_avg_sq")  # the AdamW state a reset prunes (never "step")


@torch.no_grad()
def prune_moments(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    ratio: float,
    method: str,
    generator: Optional[torch.Generator] = None,
    masks: str = "joint",
) -> float:
    """ReLoRA's optimizer reset of `params`' AdamW moments, in place; the step counter is untouched.

    masks="joint" (default): zero exactly round(`ratio`·n) entries of each param with ONE mask
    decided on exp_avg_sq (the smallest magnitudes, or a seeded random permutation) and applied
    to both moments. One mask because separate masks keep some m whose v was zeroed, and the
    next update is then ≈ lr·m/eps (docs/relora.md#optimizer-reset).
    masks="separate": `prune_moments_separately` (the official code's reset).
    Returns the fraction of moment entries zeroed.
    """
    if masks == "separate":
        return prune_moments_separately(optimizer, params, ratio, method, generator)
    zeroed = total = 0
    for p in params:
        state = optimizer.state.get(p)
        if state and "exp_avg_sq" not in state:  # bitsandbytes keeps its moments as state1/state2
            raise ConfigError(f"optim.name: the optimizer reset prunes torch AdamW's moments; {type(optimizer).__name__} has none (use optim=adamw)")
        if not state:
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


@torch.no_grad()
def prune_moments_separately(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    ratio: float,
    method: str,
    generator: Optional[torch.Generator] = None,
) -> float:
    """The official ReLoRA code's reset: exp_avg and exp_avg_sq each pruned with its OWN mask.

    magnitude: keep the entries whose |x| is above the tensor's own `ratio`-quantile of |x|
    (torch.quantile, linear interpolation; it takes up to 2^24 entries, far above an adapter
    factor's r × d); random: keep each entry with probability 1 − ratio
    (drawn from `generator`, so a resumed run draws the same masks). A moment can thus keep m
    where v was zeroed. Returns the fraction of all moment entries (m and v together) zeroed.
    """
    zeroed = total = 0
    for p in params:
        state = optimizer.state.get(p)
        if state and "exp_avg_sq" not in state:  # bitsandbytes keeps its moments as state1/state2
            raise ConfigError(f"optim.name: the optimizer reset prunes torch AdamW's moments; {type(optimizer).__name__} has none (use optim=adamw)")
        if not state:
            continue
        for key in MOMENTS:
            t = state[key]
            if method == "magnitude":
                mag = t.abs().float()
                keep = mag > torch.quantile(mag.flatten(), ratio)
            else:
                keep = (torch.rand(t.shape, generator=generator) > ratio).to(t.device)
            t.mul_(keep)
            zeroed += int((~keep).sum())
            total += t.numel()
    return zeroed / total if total else 0.0
