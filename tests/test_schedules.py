"""The jagged cosine schedule (ReLoRA): the values the issue specifies, and its refusals."""

from types import SimpleNamespace

import pytest

from lorabench.errors import ConfigError
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
