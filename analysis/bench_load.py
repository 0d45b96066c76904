"""Peak memory of loading SmolLM2-135M: the fp32 load, transformers' own 4-bit load
(`BitsAndBytesConfig`: NF4, double quant, fp32 compute), and lorabench's qlora and qalora
loads (quantized while loading), beside lorabench's float-load-then-quantize path.

Run: python analysis/bench_load.py            (~6 min on 2 CPU cores: 5 loads x 3 processes; the SmolLM2 dir
                                              is converted first if needed)

Each load runs in a fresh subprocess that imports the same libraries, reads its resident set
size (VmRSS) after the imports, loads, then reads its peak resident set size (VmHWM, the
process's high-water mark, the same figure as `ru_maxrss`) twice: at the end of the load, and
after one byte of every page of every tensor the model holds was read. transformers leaves fp32
weights memory-mapped from the file, resident only once read, so the second figure is the one
that compares loads: the model in memory. The table gives the raw peaks and the peak over the
after-imports baseline; nothing else is subtracted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOADS = {  # name -> what the subprocess does
    "fp32": "transformers from_pretrained, fp32",
    "hf-bnb-nf4": "transformers from_pretrained + BitsAndBytesConfig(nf4, double quant, fp32 compute)",
    "qlora": "lorabench load_backbone, strategy=qlora (NF4, double quant; quantized while loading)",
    "qalora": "lorabench load_backbone, strategy=qalora (INT4 g=32 rtn; quantized while loading)",
    "qlora-float-first": "lorabench: fp32 from_pretrained, then quantize_backbone (qlora's format)",
}


def status_bytes(field: str) -> int:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def job_cfg(strategy: str):  # noqa: ANN201 - a Hydra DictConfig
    """The real config tree of `lorabench model=smollm2 strategy=<strategy>`."""
    from hydra import compose, initialize_config_dir

    from lorabench.checks import register_configs

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["model=smollm2", f"strategy={strategy}"])


def one(kind: str, directory: Path) -> dict:
    """Load once (in this fresh process) and return its memory figures."""
    import torch
    import bitsandbytes  # noqa: F401 - every kind imports the same libraries
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorabench.backbone import load_backbone, load_float
    from lorabench.memory import account_model, measured_bytes
    from lorabench.quant import quantize_backbone
    from lorabench.strategies import build_strategy

    torch.set_num_threads(1)
    cfg = job_cfg("qalora" if kind == "qalora" else "qlora")
    fmt = build_strategy(cfg.strategy, seed=0).base_format()
    cpu = torch.device("cpu")
    baseline = status_bytes("VmRSS")
    if kind == "fp32":
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    elif kind == "hf-bnb-nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, quantization_config=q, device_map="cpu")
    elif kind == "qlora-float-first":
        model, _ = load_float(cfg.model, 0, cpu)
        quantize_backbone(model, fmt)
    else:
        model, _ = load_backbone(cfg.model, 0, cpu, fmt)
    loaded = status_bytes("VmHWM")
    held = account_model(model).held_tensors
    for t in held:  # read one byte per page: weights still only memory-mapped become resident
        t.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    peak = status_bytes("VmHWM")
    return {"kind": kind, "loaded": loaded, "peak": peak, "baseline": baseline, "over": peak - baseline,
            "held": measured_bytes(model)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", choices=list(LOADS), help="(internal) run one load in this process and print its JSON")
    p.add_argument("--dir", type=Path, help="(internal) the converted SmolLM2 dir")
    p.add_argument("--kinds", nargs="+", default=list(LOADS), choices=list(LOADS), help="loads to measure")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per load (the table gives the median and range)")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.dir)))
        return 0
    from lorabench.backbone.gguf import ensure_converted

    model_cfg = job_cfg("qlora").model
    directory = ensure_converted(model_cfg.gguf_file, model_cfg.cache_dir)
    rows = {}
    for kind in a.kinds:
        runs = []
        for _ in range(a.repeats):
            r = subprocess.run([sys.executable, __file__, "--one", kind, "--dir", str(directory)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{kind}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}", file=sys.stderr)
                break
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
        if runs:
            rows[kind] = {k: statistics.median(r[k] for r in runs) for k in ("loaded", "peak", "baseline", "over", "held")}
            rows[kind]["range"] = (min(r["over"] for r in runs), max(r["over"] for r in runs))
    anchor = rows.get("hf-bnb-nf4")
    mb = 1e6
    print(f"\nmedian of {a.repeats} fresh processes per load")
    print("\n| load | after-imports RSS MB | peak RSS at end of load MB | peak RSS, weights resident MB "
          "| peak over after-imports MB (range) | ÷ transformers' 4-bit | model holds MB |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in rows.items():
        ratio = f"{r['over'] / anchor['over']:.2f}" if anchor else "n/a"
        lo, hi = r["range"]
        print(f"| {kind}: {LOADS[kind]} | {r['baseline'] / mb:.1f} | {r['loaded'] / mb:.1f} | {r['peak'] / mb:.1f} "
              f"| {r['over'] / mb:.1f} ({lo / mb:.0f}–{hi / mb:.0f}) | {ratio} | {r['held'] / mb:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
