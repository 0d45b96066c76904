"""Learning-rate schedules as multipliers of the peak lr, registered by name (`optim.scheduler`).

Hand-written (a few lines each) because the jagged restarts have no library version and
one registry keeps every schedule resumable through `LambdaLR`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from lorabench.errors import ConfigError
from lorabench.registry import Registry

Schedule = Callable[[int], float]
ScheduleBuilder = Callable[[Any, int], Schedule]  # (optim_cfg, total_steps) -> (step -> multiplier)
SCHEDULES: Registry[ScheduleBuilder] = Registry("schedule", "optim.scheduler")


def register_schedule(name: str) -> Callable[[ScheduleBuilder], ScheduleBuilder]:
    """Decorator: make `builder(optim_cfg, total_steps)` selectable as `optim.scheduler=<name>`."""
    return SCHEDULES.register(name)


def available_schedules() -> list[str]:
    """Names accepted by `optim.scheduler`."""
    return SCHEDULES.names()


def build_schedule(optim_cfg: Any, total_steps: int) -> Schedule:
    """The multiplier function for `optim_cfg.scheduler` over `total_steps`."""
    return SCHEDULES.get(optim_cfg.scheduler)(optim_cfg, total_steps)


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


@register_schedule("constant")
def constant(optim_cfg: Any, total_steps: int) -> Schedule:
    """Linear warmup, then the peak lr (QLoRA's recipe)."""
    return lambda step: _warmup(step, optim_cfg.warmup_steps)


def cosine_value(step: int, total_steps: int, warmup: int, min_ratio: float) -> float:
    """Cosine decay from 1 at the end of warmup to `min_ratio` at the last step."""
    span = max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register_schedule("cosine")
def cosine(optim_cfg: Any, total_steps: int) -> Schedule:
    """Linear warmup, then one cosine to `min_lr_ratio`."""
    w, r = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < w:
            return _warmup(step, w)
        return cosine_value(step, total_steps, w, r)

    return f


@register_schedule("jagged_cosine")
def jagged_cosine(optim_cfg: Any, total_steps: int) -> Schedule:
    """ReLoRA's schedule: linear warmup, one global cosine to `min_lr_ratio`, and at every
    multiple of `restart_every` a drop to 0 followed by a linear ramp over
    `restart_warmup_steps` up to the cosine's value at the end of that ramp.

    The multiplier for step s is what LambdaLR applies to the update made after s steps,
    so a merge after step k·restart_every is followed by an update at lr 0 (the trough).
    Bad settings raise ConfigError here, when the trainer builds the schedule before the
    first step, because only then is `total_steps` known.
    """
    w, r = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio
    every, ramp = optim_cfg.restart_every, optim_cfg.restart_warmup_steps
    if every <= 0:
        raise ConfigError(f"optim.restart_every: jagged_cosine needs a restart period > 0, got {every}")
    if ramp <= 0 or ramp >= every:
        raise ConfigError(
            f"optim.restart_warmup_steps: must be in [1, optim.restart_every={every}) "
            f"(the drop to 0 and the re-warmup must fit in one cycle), got {ramp}"
        )
    if total_steps % every != 0:
        raise ConfigError(
            f"optim.restart_every: {every} does not divide the {total_steps} training steps; "
            "choose a divisor so that every cycle is complete"
        )
    if w > every:
        raise ConfigError(
            f"optim.warmup_steps: {w} is longer than optim.restart_every={every}; the first restart would cut the warmup"
        )

    def f(step: int) -> float:
        if step < w:
            return _warmup(step, w)
        k, into = divmod(step, every)
        if k >= 1 and into < ramp:
            # ramp from 0 towards where the cosine will be when the ramp ends
            target = cosine_value(k * every + ramp, total_steps, w, r)
            return target * into / ramp
        return cosine_value(step, total_steps, w, r)

    return f
