"""qlora: the shared bnb 4-bit backbone, training after an eval pass, merges, bad input."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lorabench import memory
from lorabench.adapters.lora import LoRALinear
from lorabench.quant import quantize_backbone
from lorabench.quant import bnb4bit
from lorabench.errors import ConfigError
from lorabench.strategies import build_strategy
from lorabench.strategies.base import BaseFormat
from tests.helpers import build_on_tiny, tiny_llama


def fixed_batch(n: int = 8, length: int = 24) -> torch.Tensor:
    """A learnable batch (each row repeats its first half), the same every step."""
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, 48, (n, length // 2), generator=g)
    return torch.cat([half, half], 1)


def build(name: str, **keys):
    return build_on_tiny(name, **{"rank": 4, "alpha": 8.0, **keys})


def train(strategy, model, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for _, p in strategy.trainable_parameters(model)], lr=lr)
    batch = fixed_batch()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def eval_pass(model: nn.Module) -> torch.Tensor:
    """What the trainer's evaluation does: eval mode, no grad, a forward."""
    model.eval()
    out = model(fixed_batch()).logits
    model.train()
    return out


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(fixed_batch()).logits.float()
    model.train(was)
    return out


def test_base_format_comes_from_own_keys_and_formula_is_half_byte():
    s = build_strategy({"name": "qlora", "quant_type": "fp4", "double_quant": False, "blocksize": 128}, seed=0)
    fmt = s.base_format()
    assert fmt.method == "bnb4bit" and fmt.target_modules == "all-linear"
    assert fmt.options == {"quant_type": "fp4", "double_quant": False, "blocksize": 128, "compute_dtype": "bf16"}
    assert s.formula_bytes(1000, 10) == int(0.5 * 1000 + 16 * 10)


def test_quantizer_replaces_only_targeted_linears_without_drawing_rng():
    model = tiny_llama()
    ref = tiny_llama()
    state = torch.get_rng_state()
    names = quantize_backbone(model, BaseFormat("bnb4bit", "all-linear", {"compute_dtype": "fp32"}))
    assert torch.equal(state, torch.get_rng_state())  # so adapter init is the same as lora's
    assert len(names) == 2 * 7
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert layer.support_avx512bf16_for_cpu is False  # docs/qlora.md#bitsandbytes-on-cpu
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, ref.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert torch.equal(model.model.norm.weight, ref.model.norm.weight)
    # dequantizing is exact w.r.t. what the layer computes (fp32 compute)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(bnb4bit.dequantize_linear4bit(layer)(x), layer(x), atol=1e-6)
    # ... and close to the original weights (4-bit rounding only)
    w0 = ref.model.layers[0].mlp.down_proj.weight
    err = (bnb4bit.dequantized_weight(layer) - w0).abs().max() / w0.abs().max()
    assert err < 0.15


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_eval_then_train_loss_falls_and_16bit_merge_is_exact(compute_dtype):
    """docs/qlora.md#bitsandbytes-on-cpu: an eval-mode no-grad forward first, then training must still work."""
    strategy, model = build("qlora", compute_dtype=compute_dtype)
    eval_pass(model)
    for _, layer in bnb4bit.linear4bit_layers(model):
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    losses = train(strategy, model, steps=40)
    assert losses[-1] < 0.8 * losses[0], losses
    # the eval pass changed nothing: the same run without it gives the same curve
    strategy2, model2 = build("qlora", compute_dtype=compute_dtype)
    assert train(strategy2, model2, steps=40) == pytest.approx(losses, abs=1e-6)
    # gradients reach the first layer's adapters (the repacked kernel has no autograd)
    first = model.model.layers[0].self_attn.q_proj
    assert isinstance(first, LoRALinear) and first.lora_B.weight.abs().sum() > 0

    eval_pass(model)
    merged = strategy.merge_to_16bit(model)
    assert not bnb4bit.linear4bit_layers(merged) and not any(isinstance(m, LoRALinear) for m in merged.modules())
    diff = (logits(merged) - logits(model)).abs().max().item()
    if compute_dtype == "fp32":
        assert diff < 1e-4  # exact up to fp32 rounding
    else:
        # the adapter model rounds its base matmuls to bf16 (2^-8 relative); the merged
        # fp32 model does not: equal to that rounding, not better
        assert diff < 0.05 * logits(model).abs().max().item()
    # merging copied: the adapter model is intact and still trains
    assert bnb4bit.linear4bit_layers(model)
    assert train(strategy, model, steps=2)[-1] < losses[0]


def test_merge_choices_16bit_and_nf4(tmp_path):
    strategy, model = build("qlora", compute_dtype="fp32", merge="16bit")
    train(strategy, model, steps=20)
    m16 = strategy.merged_for_eval(model, tmp_path)
    d16 = (logits(m16) - logits(model)).abs().max().item()
    strategy.cfg.merge = "nf4"
    m4 = strategy.merged_for_eval(model, tmp_path)
    layers = bnb4bit.linear4bit_layers(m4)
    assert len(layers) == 14 and all(not l.support_avx512bf16_for_cpu for _, l in layers)
    assert all(l.weight.quant_state.quant_type == "nf4" and l.weight.quant_state.nested for _, l in layers)
    d4 = (logits(m4) - logits(model)).abs().max().item()
    assert d16 < 1e-4 < d4  # requantizing rounds (most of) the update away: lossy
    assert torch.isfinite(logits(m4)).all()
    strategy.save_artifacts(model, tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"quant_type": "int4"}, r"^strategy\.quant_type: expected one of \['nf4', 'fp4'\], got 'int4'$"),
        ({"blocksize": 48}, r"^strategy\.blocksize: bitsandbytes supports \[32, .*\], got 48$"),
        ({"compute_dtype": "fp8"}, r"^strategy\.compute_dtype: expected one of \['bf16', 'fp16', 'fp32'\], got 'fp8'$"),
        ({"merge": "nf5"}, r"^strategy\.merge: expected one of .*'nf4'.*, got 'nf5'$"),
    ],
)
def test_bad_input_is_one_line(keys, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_strategy({"name": "qlora", **keys}, seed=0)
    assert "\n" not in str(e.value)


def test_compute_dtype_the_device_cannot_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match=r"^strategy\.compute_dtype: bf16 is not supported on device 'cuda'") as e:
        bnb4bit.check_options("nf4", True, 64, "bf16", torch.device("cuda"))
    assert "\n" not in str(e.value)
    assert bnb4bit.check_options("nf4", True, 64, "fp32", torch.device("cuda")) == torch.float32


def test_trainer_end_to_end_memory_and_exact_merge(tmp_path):
    """Through the real trainer: measured within 1% of expected, merged loss = adapter loss."""
    from tests.helpers import run_tiny

    s = run_tiny(tmp_path, "strategy=qlora", "strategy.merge=16bit", "trainer.max_steps=8")
    assert s["status"] == "completed"
    assert abs(s["memory/measured_bytes"] / s["memory/expected_bytes"] - 1) < 0.01
    assert s["memory/formula_bytes"] == int(0.5 * s["params/base"] + 16 * s["params/trainable"])
    assert s["eval/loss"] < s["eval/loss_base"]
    # bf16 compute in the adapter model, fp32 in the merged one: equal to bf16 rounding
    assert s["eval/loss_merged"] == pytest.approx(s["eval/loss"], rel=1e-3)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_cli_bad_quant_type_is_one_line_and_nonzero_exit(tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, TINY

    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorabench", *TINY, f"hydra.run.dir={tmp_path}", "strategy=qlora",
           "strategy.quant_type=int4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lorabench: error:")]
    assert lines == ["lorabench: error: strategy.quant_type: expected one of ['nf4', 'fp4'], got 'int4'"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_dequantize_reads_through_a_cpu_repack():
    """If a layer was repacked anyway (flag left on by other code), merges must not read garbage."""
    # (bitsandbytes' own inverse of the repack is used; the repack itself is lossy)
    from bitsandbytes.nn.modules import has_avx512bf16

    model = tiny_llama()
    quantize_backbone(model, BaseFormat("bnb4bit", ["down_proj"], {"compute_dtype": "bf16"}))
    layer = model.model.layers[0].mlp.down_proj
    before = bnb4bit.dequantized_weight(layer).clone()
    layer.support_avx512bf16_for_cpu = has_avx512bf16()  # bitsandbytes' own default
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    # the repack stores absmax in bf16 (and drops double quant), so reading back through it
    # is exact up to that rounding: close, not garbage (why our layers never repack)
    after = bnb4bit.dequantized_weight(layer)
    assert torch.allclose(after, before, rtol=2**-7, atol=0.0)


# ---- the quantized set is the backbone, not the adapter targets ------------------------------------
@pytest.mark.parametrize("name", ["qlora", "peft_qlora"])
def test_quantized_set_is_every_decoder_linear_whatever_the_targets(name: str, tmp_path) -> None:
    from lorabench.surgery import find_target_linears

    strategy, model = build(name, target_modules=["q_proj", "v_proj"])
    linear4 = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    plain = tiny_llama()
    decoder = set(find_target_linears(plain, "all-linear"))
    # PEFT nests the base layer as `<name>.base_layer`; ours as `<name>.base_layer` too
    assert {n.removesuffix(".base_layer").removeprefix("base_model.model.") for n in linear4} == decoder
    assert type(model.get_submodule("lm_head") if name == "qlora" else model.get_base_model().lm_head).__name__ == "Linear"
    acct = memory.account_model(model)
    assert acct.base_quantized == sum(plain.get_submodule(n).weight.numel() for n in decoder)
    # merging a subset-adapted model still gives a float model, which an INT-N requantization accepts
    merge_strategy, merge_model = build(name, target_modules=["q_proj", "v_proj"], merge="intn", merge_bits=4)
    merged = merge_strategy.merged_for_eval(merge_model, tmp_path)
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())


def test_quantize_modules_matching_nothing_is_one_line() -> None:
    from lorabench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^strategy\.quantize_modules: \['qproj'\] matched no linear layer") as e:
        build("qlora", quantize_modules=["qproj"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("quantizer", ["rtn", "hqq"])
def test_merge_intn_uses_the_named_quantizer(tmp_path, quantizer: str) -> None:
    """merge=intn quantizes the exact 16-bit merge with `merge_quantizer`: the same codes as that
    quantizer applied by hand to the merged copy (QLoRA → INT-N with QA-LoRA's own base quantizer)."""
    from lorabench.quant.intn import IntNLinear

    strategy, model = build("qlora", merge="intn", merge_bits=3, merge_quantizer=quantizer)
    torch.manual_seed(0)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B.weight, std=0.05)  # a non-zero update, so the merge matters
    merged = strategy.merged_for_eval(model, tmp_path)
    by_hand = strategy.merge_to_16bit(model)
    quantize_backbone(by_hand, BaseFormat("intn", "all-linear", {"bits": 3, "group_size": 32, "quantizer": quantizer}))
    other = strategy.merge_to_16bit(model)
    quantize_backbone(other, BaseFormat("intn", "all-linear", {"bits": 3, "group_size": 32,
                                                                "quantizer": "hqq" if quantizer == "rtn" else "rtn"}))
    layers = [(n, m) for n, m in merged.named_modules() if isinstance(m, IntNLinear)]
    assert len(layers) == 7 * 2  # every block linear of the tiny test model's 2 layers
    differs = 0
    for n, m in layers:
        assert torch.equal(m.dequantize(), by_hand.get_submodule(n).dequantize())
        differs += not torch.equal(m.dequantize(), other.get_submodule(n).dequantize())
    assert differs == len(layers)  # the other quantizer gives other weights in every layer
    with pytest.raises(ConfigError, match=r"^strategy\.merge_quantizer: expected one of \['hqq', 'rtn'\], got 'gptq'$"):
        build("qlora", merge="intn", merge_quantizer="gptq")
