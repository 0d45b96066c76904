"""Learning-rate schedules as multipliers of the peak lr, registered by name (`optim.scheduler`).

Hand-written (a few lines each) because the jagged restarts have no library version and
one registry keeps every schedule resumable through `LambdaLR`.

A schedule reads `optim` only, with one exception: ReLoRA's keys. The jagged schedule's
restart period and ReLoRA's merge period are one setting (a merge must sit at an lr trough),
so when the config tree's strategy has a merge period (`strategy.reset_every`) the schedule
refuses any other `optim.restart_every` and names the strategy's key in its errors; and a
warm start (`strategy.warm_start_steps`) is scheduled as a run of its own, without restarts
(docs/relora.md#schedule).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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


MERGE_PERIOD_KEY = "strategy.reset_every"  # a strategy's merge period; the jagged restarts must follow it


def strategy_value(optim_cfg: Any, key: str) -> Any:
    """`key` (e.g. "strategy.reset_every") of the config tree `optim_cfg` sits in; None when the
    strategy has no such key or `optim_cfg` is not part of a tree (a bare namespace in tests)."""
    if not isinstance(optim_cfg, DictConfig):
        return None
    try:  # a relative key: a sibling node of `optim`
        return OmegaConf.select(optim_cfg, ".." + key, default=None)
    except OmegaConfBaseException:  # a detached optim node has no parent
        return None


def _divisor_hint(total: int, ramp: int) -> int:
    """The largest divisor of `total` below it and above `ramp` (≥ 2 cycles), else 0."""
    return max((d for d in range(ramp + 1, total) if total % d == 0), default=0)


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


WARM_START_KEY = "strategy.warm_start_steps"  # a strategy's full-rank warm start: a run of its own, without restarts


@register_schedule("jagged_cosine")
def jagged_cosine(optim_cfg: Any, total_steps: int) -> Schedule:
    """ReLoRA's schedule: linear warmup, one global cosine to `min_lr_ratio`, and at every
    multiple of `restart_every` a drop to 0 followed by a linear ramp over
    `restart_warmup_steps` up to the cosine's value at the end of that ramp.

    With a strategy that merges (`strategy.reset_every`), `restart_every` must equal it and
    errors name the strategy's key, which is the one a user sets. With a warm start
    (`strategy.warm_start_steps` = W > 0) the schedule is two runs, as the official code
    runs them: steps [0, W) are a plain warmup + cosine over W steps (no restarts), and the
    low-rank phase is a jagged run of its own over the remaining steps, with its own first
    warmup and restarts counted from W.

    The multiplier for step s is what LambdaLR applies to the update made after s steps,
    so a merge after step k·restart_every is followed by an update at lr 0 (the trough).
    Bad settings raise ConfigError here, when the trainer builds the schedule before the
    first step, because only then is `total_steps` known.
    """
    w, r = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio
    every, ramp = optim_cfg.restart_every, optim_cfg.restart_warmup_steps
    merges = strategy_value(optim_cfg, MERGE_PERIOD_KEY)
    warm = int(strategy_value(optim_cfg, WARM_START_KEY) or 0)
    key = "optim.restart_every" if merges is None else MERGE_PERIOD_KEY  # the key a user should change
    follows = merges is not None and strategy_value(optim_cfg, "strategy.restart_warmup_steps") == ramp
    ramp_key = "strategy.restart_warmup_steps" if follows else "optim.restart_warmup_steps"
    if merges is not None and merges != every:
        raise ConfigError(
            f"{MERGE_PERIOD_KEY}: the lr restarts must follow the merge period, but optim.restart_every={every} "
            f"differs from {MERGE_PERIOD_KEY}={merges}; set only {MERGE_PERIOD_KEY} (optim.restart_every follows it)"
        )
    if every <= 0:
        raise ConfigError(f"{key}: jagged_cosine needs a restart period > 0, got {every}")
    if ramp <= 0 or ramp >= every:
        raise ConfigError(
            f"{ramp_key}: must be in [1, {key}={every}) "
            f"(the drop to 0 and the re-warmup must fit in one cycle), got {ramp}"
        )
    if total_steps % every != 0:
        hint = _divisor_hint(total_steps, ramp)
        fix = f"e.g. {key}={hint}" if hint else f"or trainer.max_steps to a multiple of {every}"
        raise ConfigError(
            f"{key}: {every} does not divide the {total_steps} training steps (trainer.max_steps); every cycle "
            f"must be complete: set it to a divisor of {total_steps} above {ramp_key}={ramp}, {fix}"
        )
    if w > every:
        raise ConfigError(
            f"optim.warmup_steps: {w} is longer than {key}={every}; the first restart would cut the warmup"
        )
    if warm >= total_steps:
        raise ConfigError(
            f"{WARM_START_KEY}: {warm} leaves no low-rank step of the {total_steps} training steps (trainer.max_steps)"
        )
    low_rank = total_steps - warm

    def jagged(step: int) -> float:
        if step < w:
            return _warmup(step, w)
        k, into = divmod(step, every)
        if k >= 1 and into < ramp:
            # ramp from 0 towards where the cosine will be when the ramp ends
            target = cosine_value(k * every + ramp, low_rank, w, r)
            return target * into / ramp
        return cosine_value(step, low_rank, w, r)

    def f(step: int) -> float:
        if step < warm:  # the warm start: a plain run of its own
            return _warmup(step, w) if step < w else cosine_value(step, warm, w, r)
        return jagged(step - warm)

    return f
