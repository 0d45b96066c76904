"""SmolLM2-135M on CPU (or CUDA), one job per strategy: step time, measured and activation bytes, and the
score before and after fine-tuning.

Run: python analysis/bench_smollm2.py --steps 4                  (memory and step time, ~1 min per strategy)
     python analysis/bench_smollm2.py --device cuda --strategies full lora qlora qalora relora peft_lora peft_qlora
                                                                 (on a GPU: tokens/s and peak memory beside PEFT's)
     python analysis/bench_smollm2.py --strategies lora --steps 150 --eval-size 100 -- task.difficulty_max=6
                                                                 (base vs fine-tuned exact match)

Each strategy is a real `lorabench model=smollm2` job (the CLI, in a subprocess, W&B off), so the
figures are the ones its summary.json records: `memory/measured_bytes` (weights with their
quantization state, grads, AdamW state after the first step), `memory/activation_bytes` (what
autograd saved for the first backward), the mean step time (`train/train_seconds / train/steps`,
which includes the first step's memory accounting) and `eval/accuracy_base` → `eval/accuracy`.
Extra Hydra overrides follow `--`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STRATEGIES = ["full", "lora", "qlora", "qalora", "relora"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, help="strategies to run, one job each")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per job")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--eval-size", type=int, default=8, help="held-out prompts scored before and after")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--task", default="sort", help="task preset (a task SmolLM2 cannot do zero-shot)")
    p.add_argument("--device", default="cpu", help="trainer.device: cpu, or cuda (peaks: torch.cuda.max_memory_allocated)")
    p.add_argument("--out", type=Path, default=None, help="where the run dirs go (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    a = p.parse_args(argv)
    out = a.out or Path(tempfile.mkdtemp(prefix="bench_smollm2_"))
    rows = []
    for name in a.strategies:
        run_dir = out / name
        cmd = [
            "lorabench", "model=smollm2", f"strategy={name}", f"task={a.task}", "logger=none",
            f"trainer.max_steps={a.steps}", f"trainer.batch_size={a.batch_size}", f"trainer.threads={a.threads}",
            f"task.eval_size={a.eval_size}", "trainer.eval_every=0", "trainer.checkpoint_every=0",
            "trainer.progress=false", f"trainer.device={a.device}", "extras.print_config=false",
            f"hydra.run.dir={run_dir}", *a.overrides,
        ]
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
            print(f"{name}: failed (see {run_dir})", file=sys.stderr)
            continue
        s = json.loads((run_dir / "summary.json").read_text())
        rows.append((name, s))
        print(json.dumps({"strategy": name, **{k: s.get(k) for k in KEYS}}), flush=True)
    print(f"\n| strategy | trainable | step s | tokens/s | measured bytes | activation bytes | peak bytes | exact match base → tuned | answer loss base → tuned |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in rows:
        step = s["train/train_seconds"] / s["train/steps"]
        peak = s.get("memory/peak_bytes")  # absent where the device's peak counter cannot be reset
        print(f"| {name} | {s['params/trainable']:,} | {step:.2f} | {s['train/tokens_per_second']:.0f} | {s['memory/measured_bytes']:,} | "
              f"{s['memory/activation_bytes']:,} | {'' if peak is None else f'{peak:,}'} | {100 * s['eval/accuracy_base']:.1f}% → {100 * s['eval/accuracy']:.1f}% | "
              f"{s['eval/loss_base']:.3f} → {s['eval/loss']:.3f} |")
    print(f"\nrun dirs: {out}")
    return 0


KEYS = ["params/trainable", "params/base_quantized", "train/steps", "train/train_seconds", "memory/measured_bytes",
        "memory/expected_bytes", "memory/activation_bytes", "memory/peak_bytes", "train/tokens_per_second", "eval/accuracy_base", "eval/accuracy", "eval/loss_base",
        "eval/loss", "train/threads"]

if __name__ == "__main__":
    sys.exit(main())
