"""The jagged cosine schedule (ReLoRA): the values the issue specifies, its refusals, and its
restart period tied to the strategy's merge period (errors name `strategy.reset_every`)."""

from types import SimpleNamespace

import pytest

from lorabench.errors import ConfigError
from lorabench.strategies import available as available_strategies
from lorabench.training.schedules import available_schedules, build_schedule


def _optim(**kw):
    base = dict(scheduler="jagged_cosine", warmup_steps=500, min_lr_ratio=0.1, restart_every=5000, restart_warmup_steps=100)
    base.update(kw)
    return SimpleNamespace(**base)


def test_registered():
    assert "jagged_cosine" in available_schedules()


@pytest.mark.parametrize(
    "step,expected",
    [(500, 1.0), (5000, 0.0), (5050, 0.441), (5100, 0.882), (10100, 0.561), (15100, 0.233), (19999, 0.100)],
)
def test_issue_values(step, expected):
    f = build_schedule(_optim(), 20000)
    assert f(step) == pytest.approx(expected, abs=1e-3)


def test_shape_warmup_troughs_and_ramps():
    f = build_schedule(_optim(), 20000)
    assert f(0) < f(250) < f(499) <= 1.0  # linear warmup
    for k in (1, 2, 3):
        s = 5000 * k
        assert f(s) == 0.0  # the trough right after each restart
        ramp = [f(s + i) for i in range(100)]
        assert ramp == sorted(ramp)  # linear ramp up
        assert f(s - 1) > f(s + 100) > 0.0  # back on the (lower) global cosine
    body = [f(s) for s in range(600, 4999)]
    assert body == sorted(body, reverse=True)  # one monotone cosine between restarts


def test_restart_equal_to_total_is_plain_cosine():
    jag = build_schedule(_optim(restart_every=1000, restart_warmup_steps=10, warmup_steps=10), 1000)
    cos = build_schedule(SimpleNamespace(scheduler="cosine", warmup_steps=10, min_lr_ratio=0.1), 1000)
    assert all(jag(s) == pytest.approx(cos(s)) for s in range(1000))


@pytest.mark.parametrize(
    "kw,total,key",
    [
        (dict(restart_every=3000), 20000, "optim.restart_every"),  # does not divide the total
        (dict(restart_every=0), 20000, "optim.restart_every"),
        (dict(restart_warmup_steps=5000), 20000, "optim.restart_warmup_steps"),  # reset_every <= re-warmup
        (dict(restart_warmup_steps=0), 20000, "optim.restart_warmup_steps"),  # no trough at all
        (dict(warmup_steps=6000), 20000, "optim.warmup_steps"),
    ],
)
def test_bad_input_one_line(kw, total, key):
    with pytest.raises(ConfigError) as e:
        build_schedule(_optim(**kw), total)
    msg = str(e.value)
    assert msg.startswith(key) and "\n" not in msg


# ---- the restart period is the strategy's merge period ---------------------------------------------
def _tree(strategy: dict, **optim):
    """An optim node inside a config tree, as the trainer and `validate` pass it."""
    from omegaconf import OmegaConf

    node = dict(scheduler="jagged_cosine", warmup_steps=10, min_lr_ratio=0.1, restart_every="${strategy.reset_every}",
                restart_warmup_steps="${strategy.restart_warmup_steps}")
    node.update(optim)
    return OmegaConf.create({"strategy": strategy, "optim": node}).optim


RELORA = {"reset_every": 50, "restart_warmup_steps": 10}


@pytest.mark.parametrize(
    "strategy,optim,total,msg",
    [
        (RELORA, {}, 40, "strategy.reset_every: 50 does not divide the 40 training steps (trainer.max_steps); every "
         "cycle must be complete: set it to a divisor of 40 above strategy.restart_warmup_steps=10, e.g. strategy.reset_every=20"),
        (RELORA, {}, 10, "strategy.reset_every: 50 does not divide the 10 training steps (trainer.max_steps); every "
         "cycle must be complete: set it to a divisor of 10 above strategy.restart_warmup_steps=10, or trainer.max_steps "
         "to a multiple of 50"),
        (RELORA, {"restart_every": 40}, 40, "strategy.reset_every: the lr restarts must follow the merge period, but "
         "optim.restart_every=40 differs from strategy.reset_every=50; set only strategy.reset_every (optim.restart_every follows it)"),
        ({"reset_every": 50, "restart_warmup_steps": 0}, {}, 200, "strategy.restart_warmup_steps: must be in "
         "[1, strategy.reset_every=50) (the drop to 0 and the re-warmup must fit in one cycle), got 0"),
        ({"name": "full"}, {"restart_every": 30, "restart_warmup_steps": 5}, 40, "optim.restart_every: 30 does not "
         "divide the 40 training steps (trainer.max_steps); every cycle must be complete: set it to a divisor of 40 "
         "above optim.restart_warmup_steps=5, e.g. optim.restart_every=20"),
    ],
)
def test_errors_name_the_key_a_user_sets(strategy, optim, total, msg):
    with pytest.raises(ConfigError) as e:
        build_schedule(_tree(strategy, **optim), total)
    assert str(e.value) == msg


def test_matching_restart_period_is_accepted_and_equals_the_bare_schedule():
    tree = build_schedule(_tree(RELORA, restart_every=50), 200)
    bare = build_schedule(_optim(warmup_steps=10, restart_every=50, restart_warmup_steps=10), 200)
    assert [tree(s) for s in range(200)] == [bare(s) for s in range(200)]
    assert tree(50) == tree(100) == tree(150) == 0.0  # troughs at the merges


@pytest.mark.parametrize("name", available_strategies())
def test_short_run_of_every_strategy_works_or_names_the_key(name):
    """`trainer.max_steps=40`: accepted, or one line naming the key and a value that works."""
    import re

    from tests.helpers import tiny_cfg

    try:
        tiny_cfg(None, f"strategy={name}", "trainer.max_steps=40")
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and name == "relora", msg
        hint = re.search(r"e\.g\. (\S+)=(\d+)$", msg)
        assert msg.startswith("strategy.reset_every: ") and hint and hint.group(1) == "strategy.reset_every"
        cfg = tiny_cfg(None, f"strategy={name}", "trainer.max_steps=40", f"{hint.group(1)}={hint.group(2)}")
        assert cfg.optim.restart_every == 20


def test_warm_start_is_a_plain_run_then_the_low_rank_run_of_its_own():
    """strategy.warm_start_steps=W: no drop to 0 at multiples of reset_every inside [0, W); there,
    warmup + one cosine over W steps; from W on, the bare jagged schedule of a (total − W)-step run."""
    warm, total = 100, 300
    tree = build_schedule(_tree({**RELORA, "warm_start_steps": warm}), total)
    plain = build_schedule(_optim(warmup_steps=10, restart_every=warm, restart_warmup_steps=10), warm)
    low = build_schedule(_optim(warmup_steps=10, restart_every=50, restart_warmup_steps=10), total - warm)
    assert [tree(s) for s in range(warm)] == [plain(s) for s in range(warm)]  # one cycle = the plain cosine
    assert min(tree(s) for s in range(warm)) > 0 and tree(50) > 0.1  # no restart at reset_every=50
    assert tree(warm - 1) == pytest.approx(0.1, abs=1e-3)  # the warm start's cosine ends at the floor
    assert [tree(s) for s in range(warm, total)] == [low(s) for s in range(total - warm)]
    assert tree(warm) == 1 / 10 and tree(warm + 50) == tree(warm + 150) == 0.0  # fresh warmup; troughs at the merges


def test_warm_start_leaving_no_low_rank_step_is_refused():
    with pytest.raises(ConfigError, match=r"^strategy\.warm_start_steps: 200 leaves no low-rank step of the 200"):
        build_schedule(_tree({**RELORA, "warm_start_steps": 200}), 200)
