"""ReLoRA invariants: identity wrap, exact merge-and-restart, high-rank accumulation,
optimizer reset (one mask or the official separate masks), merge cadence at the trough of the
jagged schedule, the warm start's switch at a trough, the paper's defaults, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from lorabench.adapters.lora import LoRALinear, lora_layers
from lorabench.adapters.relora import ReLoRAVariant
from lorabench.errors import ConfigError
from lorabench.strategies import build_strategy
from lorabench.training.optimizer import prune_moments
from tests.helpers import tiny_llama as make_llama
from tests.helpers import tiny_trainer

VOCAB = 32


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    return make_llama(seed, 32, 64, vocab=VOCAB, max_pos=32).eval()


def relora(seed: int = 0, **kw):
    node = {"name": "relora", "rank": 4, "alpha": 8.0, "reset_every": 10, "restart_warmup_steps": 0}
    node.update(kw)
    return build_strategy(node, seed=seed)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (4, 12), generator=g)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


# ---- wrap -------------------------------------------------------------------------------------
def test_wrap_is_identity_and_trainable_set():
    model = tiny_model()
    ids = batch(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    s = relora()
    s.wrap(model)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    names = [n for n, _ in s.trainable_parameters(model)]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names and "model.norm.weight" in names
    assert any("input_layernorm" in n for n in names)
    assert not any("base_layer" in n for n in names)  # the adapted bases are frozen
    assert len(lora_layers(model)) == 2 * 7  # attention + MLP linears of 2 blocks


def test_A_starts_nonzero_so_B_learns_at_the_first_step():
    model = tiny_model()
    s = relora()
    s.wrap(model)
    loss_of(model, batch(0)).backward()
    for _, layer in lora_layers(model):
        assert layer.lora_A.weight.abs().sum() > 0
        assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0


# ---- merge and restart ------------------------------------------------------------------------
def toy_layer(seed: int = 0, in_f: int = 48, out_f: int = 40, rank: int = 4, keep_factors: bool = True) -> LoRALinear:
    torch.manual_seed(seed)
    variant = ReLoRAVariant(quantized=False, keep_factors=keep_factors)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=True), rank, alpha=8.0, variant=variant)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # a trained-looking B, so the update is not zero
    return layer


def test_merge_invariance_and_exact_update():
    layer = toy_layer()
    x = torch.randn(5, 48)
    with torch.no_grad():
        y_before = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    a_old = layer.lora_A.weight.detach().clone()
    expected = (8.0 / 4) * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    err, _ = layer.variant.merge_and_restart(layer, torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer.base_layer.weight - w0, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_before, rtol=1e-5, atol=1e-5)
    assert err < 1e-4  # fp32 base: the stored weight is the intended one
    # after the reinit: B = 0 and A redrawn inside kaiming_uniform(a=√5)'s bound 1/√in
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1.0 / math.sqrt(48)
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert not torch.equal(a, a_old)


def test_accumulated_update_rank_exceeds_r():
    layer = toy_layer()
    w_start = layer.base_layer.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    for cycle in range(3):
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        layer.variant.merge_and_restart(layer, gen)
    direct = torch.linalg.matrix_rank(layer.base_layer.weight.detach().double() - w_start.double(), rtol=1e-5)
    assert int(direct) == 3 * 4 > layer.rank
    assert layer.variant.accumulated_update_rank(layer) == 3 * 4


def test_rank_grows_when_training_with_merges():
    """Fit a full-rank linear map with r=2 cycles: each merge adds new directions."""
    torch.manual_seed(0)
    target = torch.randn(16, 16)
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    s = relora(rank=2, alpha=2.0, reset_every=20, train_full_rank=[], keep_factors=True)
    s.wrap(model)
    opt = torch.optim.AdamW([p for _, p in s.trainable_parameters(model)], lr=1e-2)
    for step in range(1, 101):
        x = torch.randn(32, 16)
        loss = ((model(x) - x @ target.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        s.on_step_end(step, model, opt)
    m = s.final_metrics(model)
    assert m["relora/merges"] == 5
    assert m["relora/update_rank_min"] > 2 * s.cfg.rank


# ---- optimizer reset --------------------------------------------------------------------------
def _one_step(model, s, steps: int = 1):
    opt = torch.optim.AdamW([p for _, p in s.trainable_parameters(model)], lr=1e-3)
    for i in range(steps):  # two steps: A's gradient is zero while B is still 0
        loss_of(model, batch(i)).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_optimizer_reset_only_adapters_in_place(method):
    model = tiny_model()
    s = relora(prune_ratio=0.9, optimizer_reset=method)
    s.wrap(model)
    opt = _one_step(model, s, steps=2)
    adapters = s._adapter_params(model)
    adapter_ids = {id(p) for p in adapters}
    others = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items() if id(p) not in adapter_ids}
    assert others  # embeddings / norms / lm_head have moments too
    ptrs = {id(p): (opt.state[p]["exp_avg"].data_ptr(), opt.state[p]["exp_avg_sq"].data_ptr()) for p in adapters}
    steps = {id(p): opt.state[p]["step"].clone() for p in adapters}
    v_before = {id(p): opt.state[p]["exp_avg_sq"].clone() for p in adapters}
    frac = prune_moments(opt, adapters, 0.9, method, torch.Generator().manual_seed(0))
    assert frac == pytest.approx(0.9, abs=0.01)
    for p in adapters:
        st = opt.state[p]
        assert (st["exp_avg"].data_ptr(), st["exp_avg_sq"].data_ptr()) == ptrs[id(p)]  # in place
        assert torch.equal(st["step"], steps[id(p)])  # Adam's step counter untouched
        zero_v = st["exp_avg_sq"] == 0
        assert bool((st["exp_avg"][zero_v] == 0).all())  # one mask for both moments
        assert zero_v.float().mean().item() == pytest.approx(0.9, abs=0.05)
        if method == "magnitude":
            kept = v_before[id(p)][~zero_v]
            dropped = v_before[id(p)][zero_v]
            if kept.numel() and dropped.numel():
                assert kept.min() >= dropped.max()  # the largest second moments survive
    for p, st in opt.state.items():
        if id(p) in others:
            for k, v in st.items():
                assert torch.equal(v, others[id(p)][k])  # non-adapter moments untouched


# ---- cadence (through the trainer's step API) ------------------------------------------------------
def _relora_overrides(total: int, warm: int, every: int = 5) -> list[str]:
    return [
        "strategy=relora", f"strategy.reset_every={every}", f"strategy.warm_start_steps={warm}",
        "strategy.restart_warmup_steps=3", "optim.warmup_steps=2", f"trainer.max_steps={total}", "seed=3",
    ]


@pytest.mark.parametrize("total,warm", [(20, 0), (20, 5), (15, 0)])
def test_merge_count_and_trough(total, warm):
    trainer = tiny_trainer(None, *_relora_overrides(total, warm))
    merges = {}
    while trainer.state.step < total:
        metrics = trainer.train_step()
        if "relora/merges" in metrics:
            merges[trainer.state.step] = metrics
    assert sorted(merges) == [s for s in range(1, total + 1) if s > warm and s % 5 == 0]
    assert [m["relora/merges"] for m in merges.values()] == list(range(1, len(merges) + 1))
    assert all(m["relora/lr_after_merge"] == 0.0 for m in merges.values())  # the next update is at lr 0: the trough


def test_merge_in_model_keeps_outputs():
    model = tiny_model()
    s = relora(reset_every=1)
    s.wrap(model)
    opt = _one_step(model, s)
    ids = batch(5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    s.on_step_end(1, model, opt)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert all(torch.count_nonzero(l.lora_B.weight) == 0 for _, l in lora_layers(model))


def test_bf16_base_trains_and_logs_rounding_error():
    model = tiny_model()
    s = relora(base="bf16", reset_every=2)
    s.wrap(model)
    assert all(l.base_layer.weight.dtype == torch.bfloat16 for _, l in lora_layers(model))
    opt = torch.optim.AdamW([p for _, p in s.trainable_parameters(model)], lr=1e-2)
    for step in (1, 2):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
        m = s.on_step_end(step, model, opt)
    assert m["relora/merges"] == 1 and 0 < m["relora/merge_error_rel"] < 0.1


# ---- resume (through the trainer's step API) --------------------------------------------------------
@pytest.mark.parametrize("warm,stop", [(0, 7), (5, 3), (5, 5), (5, 12)])
def test_resume_mid_cycle_equals_uninterrupted(tmp_path, warm, stop):
    """Checkpoints mid-cycle, inside the warm start, exactly at its end, and after merges."""
    over = _relora_overrides(20, warm)
    ref = tiny_trainer(None, *over)
    while ref.state.step < 20:
        ref.train_step()
    cut = tiny_trainer(tmp_path, *over)
    while cut.state.step < stop:
        cut.train_step()
    cut.save_checkpoint()
    resumed = tiny_trainer(tmp_path, *over, setup=False)
    with torch.no_grad():  # start the resumed model elsewhere: the checkpoint must hold everything
        for p in resumed.model.parameters():
            p.add_(0.01)
    resumed.setup()
    assert resumed.state.step == stop
    while resumed.state.step < 20:
        resumed.train_step()
    ref_sd, res_sd = ref.model.state_dict(), resumed.model.state_dict()
    assert ref_sd.keys() == res_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(res_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    assert resumed.strategy.merges == ref.strategy.merges == (20 - warm) // 5
    assert resumed.strategy.final_metrics(resumed.model) == ref.strategy.final_metrics(ref.model)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,key",
    [
        ({"prune_ratio": 1.5}, "strategy.prune_ratio"),
        ({"prune_ratio": -0.1}, "strategy.prune_ratio"),
        ({"reset_every": 0}, "strategy.reset_every"),
        ({"reset_every": 5, "restart_warmup_steps": 5}, "strategy.reset_every"),
        ({"optimizer_reset": "topk"}, "strategy.optimizer_reset"),
        ({"base": "int3"}, "strategy.base"),
        ({"base": "nf4", "warm_start_steps": 10}, "strategy.warm_start_steps"),
        ({"warm_start_steps": 15}, "strategy.warm_start_steps"),  # not a multiple of reset_every=10
        ({"warm_start_steps": 3}, "strategy.warm_start_steps"),
        ({"reset_masks": "both"}, "strategy.reset_masks"),
        ({"min_lr_ratio": 1.5}, "strategy.min_lr_ratio"),
    ],
)
def test_bad_input_one_line(kw, key):
    with pytest.raises(ConfigError) as e:
        relora(**kw)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_unmatched_full_rank_name_is_refused():
    s = relora(train_full_rank=["wte"])
    with pytest.raises(ConfigError, match="strategy.train_full_rank"):
        s.wrap(tiny_model())


# ---- 4-bit base ---------------------------------------------------------------------------------
def _nf4_model(master: str, seed: int = 0, keep_factors: bool = True):
    from lorabench.quant import quantize_backbone

    model = tiny_model(seed)
    s = relora(base="nf4", master_copy=master, reset_every=2, compute_dtype="fp32", keep_factors=keep_factors)
    quantize_backbone(model, s.base_format())
    s.wrap(model)
    model.train()
    return model, s


@pytest.mark.parametrize("master", ["none", "bf16", "auto"])
def test_nf4_merge_requantizes_and_logs_error(master):
    model, s = _nf4_model(master)
    opt = torch.optim.AdamW([p for _, p in s.trainable_parameters(model)], lr=1e-2)
    ids = batch(9)
    for step in range(1, 5):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            with torch.no_grad():
                before = model(input_ids=ids).logits
            m = s.on_step_end(step, model, opt)
            with torch.no_grad():
                after = model(input_ids=ids).logits
            assert (after - before).abs().max() < 0.5  # only the 4-bit rounding of the merged update changes outputs
    assert m["relora/merges"] == 2
    assert m["relora/merge_error"] > 0 and m["relora/merge_error_rel"] > 0  # rounding to the NF4 grid is logged
    fm = s.final_metrics(model)
    assert fm["relora/requant_drift"] > 0 and fm["relora/update_rank_min"] == 2 * s.cfg.rank
    layer = lora_layers(model)[0][1]
    assert type(layer.base_layer).__name__ == "Linear4bit"
    want = {"none": None, "bf16": torch.bfloat16, "auto": torch.float32}[master]  # auto = fp32 over nf4
    assert (layer.master.dtype if layer.master is not None else None) == want
    # the checkpoint restores the requantized base bit for bit (and the master copy); it holds
    # no factors, so the restored run's rank and drift metrics are absent, the rest equal
    state = s.state_dict(model)
    model2, s2 = _nf4_model(master, seed=1)
    s2.load_state_dict(model2, state)
    with torch.no_grad():
        torch.testing.assert_close(model2(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    if layer.master is not None:
        assert torch.equal(lora_layers(model2)[0][1].master, layer.master)
    restored = s2.final_metrics(model2)
    assert "relora/update_rank_min" not in restored and "relora/requant_drift" not in restored
    assert restored == {k: v for k, v in fm.items() if k in restored} and "relora/merge_error" in restored


# ---- end to end through the trainer ---------------------------------------------------------------
def _compose(run_dir, overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from lorabench.cli import conf_dir
    from lorabench.checks import register_configs

    register_configs()
    base = [
        "strategy=relora", "model.pretrain_steps=0", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "task=corpus", "task.train_size=400", "task.eval_size=40", "logger=none",
        "trainer=debug", "trainer.max_steps=12", "trainer.batch_size=4", "trainer.checkpoint_every=3",
        "strategy.reset_every=4", "optim.scheduler=jagged_cosine", "optim.restart_every=4",
        "optim.restart_warmup_steps=2", "strategy.restart_warmup_steps=2", "optim.warmup_steps=2",
    ]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=base + list(overrides))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.model.cache_dir = str(run_dir.parent / "cache")
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("warm", [0, 4])
def test_trainer_resume_mid_cycle_equals_uninterrupted(tmp_path, monkeypatch, warm):
    """A job killed after a merge (checkpoint at step 6, merges at 4 and 8) and resumed ends
    exactly where an uninterrupted job ends."""
    import json

    from lorabench.training import job
    from lorabench.checks import validate
    from lorabench.strategies.relora import ReLoRA

    over = [f"strategy.warm_start_steps={warm}"]
    ref = job.run(_compose(tmp_path / "ref", over))

    class Preempted(Exception):
        pass

    orig = ReLoRA.on_step_end

    def dying(self, step, model, opt):
        if step == 8:
            raise Preempted()
        return orig(self, step, model, opt)

    cfg = _compose(tmp_path / "cut", over)
    validate(cfg)
    monkeypatch.setattr(ReLoRA, "on_step_end", dying)
    with pytest.raises(Preempted):
        job.run(cfg)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["step"] == 6  # mid-cycle, after the merge at step 4
    calls = []

    def counting(self, step, model, opt):
        calls.append(step)
        return orig(self, step, model, opt)

    monkeypatch.setattr(ReLoRA, "on_step_end", counting)
    resumed = job.run(_compose(tmp_path / "cut", over))
    assert calls == list(range(7, 13))  # it resumed from the checkpoint, not from scratch
    assert resumed["relora/merges"] == ref["relora/merges"] == (12 - warm) // 4
    for k, v in ref.items():
        if k.startswith(("eval/", "relora/")):
            assert resumed[k] == v, k
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "completed"


def test_warm_start_runs_at_its_own_lr(tmp_path):
    """lr_scale: the full-rank warm start uses warm_start_lr_ratio × the schedule, then the schedule."""
    import json

    from tests.helpers import run_tiny

    s = relora(warm_start_steps=4, reset_every=2, warm_start_lr_ratio=0.25)
    assert [s.lr_scale(k) for k in (0, 3, 4, 9)] == [0.25, 0.25, 1.0, 1.0]

    def lrs(run_dir, ratio):
        run_tiny(run_dir, "strategy=relora", "strategy.reset_every=2", "strategy.restart_warmup_steps=1",
                 "strategy.warm_start_steps=2", f"strategy.warm_start_lr_ratio={ratio}", "optim.warmup_steps=0")
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}

    scaled, plain = lrs(tmp_path / "a", 0.5), lrs(tmp_path / "b", 1.0)
    assert scaled[1] == pytest.approx(0.5 * plain[1]) and scaled[2] == pytest.approx(0.5 * plain[2])
    assert [scaled[k] for k in (3, 4, 5, 6)] == pytest.approx([plain[k] for k in (3, 4, 5, 6)])


# ---- the warm start is a run of its own ----------------------------------------------------------------
def test_warm_start_has_no_restarts_and_low_rank_is_a_run_of_its_own():
    """train/lr of every update, warm start of 8 steps with reset_every=4: no drop to 0 at step 4
    (inside the warm start); the warm start is a plain warmup + cosine over its 8 steps, the
    low-rank phase a jagged run over the remaining 8 with its own warmup and a trough after the
    merge at step 12; floor 0.1 (ReLoRA's default)."""
    trainer = tiny_trainer(
        None, "strategy=relora", "strategy.reset_every=4", "strategy.warm_start_steps=8",
        "strategy.restart_warmup_steps=2", "strategy.warm_start_lr_ratio=0.5", "optim.warmup_steps=2",
        "trainer.max_steps=16",
    )
    lrs = []
    while trainer.state.step < 16:
        lrs.append(trainer.train_step()["train/lr"])  # lrs[s]: the lr of the update after s steps
    peak = 3e-3  # ReLoRAConfig.lr, optim.lr's default

    def c(t, span):  # a cosine from 1 at the end of the 2-step warmup to the floor 0.1 at step `span`
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 2) / (span - 2)))

    warm = [0.5 * 0.5, 0.5 * 1.0] + [0.5 * c(t, 8) for t in range(2, 8)]  # 0.5 × (warmup, cosine over 8)
    low = [0.5, 1.0, c(2, 8), c(3, 8), 0.0, c(6, 8) / 2, c(6, 8), c(7, 8)]  # warmup, cosine, merge → trough, ramp
    assert lrs == pytest.approx([peak * m for m in warm + low], rel=1e-6, abs=1e-12)
    assert all(lr > 0 for lr in lrs[:8]) and lrs[12] == 0.0
    assert trainer.strategy.merges == 2  # after steps 12 and 16


# ---- optimizer reset options ---------------------------------------------------------------------
def _fake_moments(shape=(8, 50), n=3, seed=0):
    """An AdamW whose moments are independent random values (so m and v order entries differently)."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape)) for _ in range(n)]
    opt = torch.optim.AdamW(params)
    for p in params:
        opt.state[p] = {
            "step": torch.tensor(3.0),
            "exp_avg": torch.randn(shape, generator=g),
            "exp_avg_sq": torch.rand(shape, generator=g) + 1e-3,
        }
    before = {id(p): {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in params}
    return opt, params, before


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_joint_reset_zeroes_exactly_ratio_with_one_mask(method):
    opt, params, before = _fake_moments()
    frac = prune_moments(opt, params, 0.99, method, torch.Generator().manual_seed(1), masks="joint")
    assert frac == 396 / 400  # round(0.99 · 400) entries of each 8×50 tensor
    for p in params:
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        assert int((v == 0).sum()) == 396
        assert torch.equal(m == 0, v == 0)  # one mask: no m survives where v was zeroed
        if method == "magnitude":
            kept = before[id(p)]["exp_avg_sq"][v != 0]
            assert torch.equal(torch.sort(kept).values, torch.sort(before[id(p)]["exp_avg_sq"].flatten()).values[-4:])


def test_separate_magnitude_reset_uses_each_moments_own_quantile():
    import numpy as np

    opt, params, before = _fake_moments()
    frac = prune_moments(opt, params, 0.99, "magnitude", masks="separate")
    zeroed = 0
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            x = before[id(p)][key].abs().numpy()
            expected_zero = x <= np.quantile(x, 0.99)  # numpy's linear quantile, as torch.quantile's
            got_zero = (opt.state[p][key] == 0).numpy()
            assert (got_zero == expected_zero).all(), key
            assert got_zero.sum() == 396  # 400 distinct values: exactly 4 above the 0.99 quantile
            zeroed += int(got_zero.sum())
        # separate masks: some entries keep m where v was zeroed
        m0, v0 = opt.state[p]["exp_avg"] == 0, opt.state[p]["exp_avg_sq"] == 0
        assert bool((v0 & ~m0).any()) and not torch.equal(m0, v0)
    assert frac == zeroed / (2 * 3 * 400)


def test_separate_random_reset_official_default_ratio():
    """Official default: random, 0.999, a Bernoulli mask per moment (seeded: a resume draws the same)."""
    opt, params, _ = _fake_moments(shape=(100, 100), n=1)
    frac = prune_moments(opt, params, 0.999, "random", torch.Generator().manual_seed(5), masks="separate")
    st = opt.state[params[0]]
    m0, v0 = st["exp_avg"] == 0, st["exp_avg_sq"] == 0
    for z in (m0, v0):
        assert abs(int(z.sum()) - 9990) <= 16  # binomial(10⁴, 0.999): std 3.2
    assert frac == (int(m0.sum()) + int(v0.sum())) / 20000
    assert not torch.equal(m0, v0)  # two masks
    again, params2, _ = _fake_moments(shape=(100, 100), n=1)
    prune_moments(again, params2, 0.999, "random", torch.Generator().manual_seed(5), masks="separate")
    assert torch.equal(again.state[params2[0]]["exp_avg"] == 0, m0)


def test_strategy_passes_reset_masks_at_a_merge():
    model = tiny_model()
    s = relora(reset_every=10, prune_ratio=0.5, optimizer_reset="random", reset_masks="separate")
    s.wrap(model)
    opt = _one_step(model, s, steps=2)
    m = s.on_step_end(10, model, opt)
    assert m["relora/pruned_fraction"] == pytest.approx(0.5, abs=0.03)
    orphans = sum(
        int(((opt.state[p]["exp_avg_sq"] == 0) & (opt.state[p]["exp_avg"] != 0)).sum()) for p in s._adapter_params(model)
    )
    assert orphans > 0  # separate masks, as configured (the default joint mask never leaves one)


# ---- defaults and the seed formula ------------------------------------------------------------------
def test_relora_defaults_follow_the_paper_and_others_keep_theirs():
    from tests.helpers import compose_cfg

    cfg = compose_cfg("strategy=relora")
    assert cfg.optim.min_lr_ratio == 0.1 and cfg.strategy.min_lr_ratio == 0.1
    assert cfg.optim.restart_every == cfg.strategy.reset_every == 50
    # the official code's reset: random pruning at 0.999, a mask per moment
    assert (cfg.strategy.optimizer_reset, cfg.strategy.reset_masks, cfg.strategy.prune_ratio) == ("random", "separate", 0.999)
    assert (cfg.strategy.master_copy, cfg.strategy.keep_factors) == ("auto", False)
    assert compose_cfg("strategy=lora").optim.min_lr_ratio == 0.0


@pytest.mark.parametrize("base,per_weight", [("fp32", 4.0), ("bf16", 4.0), ("nf4", 0.5)])
def test_seed_formula_is_one_rule(base, per_weight):
    """4N + 16M over any 16/32-bit base (bf16 included), 0.5N + 16M over a 4-bit one."""
    s = relora(base=base)
    assert s.formula_bytes(1000, 10) == int(per_weight * 1000) + 160
    assert s.formula_bytes(123_457, 3_001) == int(per_weight * 123_457) + 16 * 3_001


def test_bf16_base_formula_in_the_trainer_is_4n():
    trainer = tiny_trainer(None, *_relora_overrides(5, 0), "strategy.base=bf16")
    trainer.train_step()
    f = trainer.state.measured
    assert f["memory/formula_bytes"] == 4 * f["params/base"] + 16 * f["params/trainable"]
    assert f["memory/expected_bytes"] < f["memory/formula_bytes"]  # the adapted bases really are 2 B each


# ---- the relora_table2 cells -------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["full", "lora", "lora_ws", "relora", "relora_ws"])
def test_table2_cells_compose_and_validate(cell):
    from omegaconf import OmegaConf

    from lorabench.checks import validate
    from tests.helpers import compose_cfg

    cfg = compose_cfg("experiment=relora_table2", f"+experiment/relora_table2@_global_={cell}")
    OmegaConf.resolve(cfg)
    typed = validate(cfg)
    if cell != "full":
        assert cfg.optim.restart_every == typed.reset_every and typed.warm_start_steps % typed.reset_every == 0
