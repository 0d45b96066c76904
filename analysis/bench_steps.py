"""Step-time benchmark of issue 3: lora, qlora, peft_lora, peft_qlora in one process.

Run: OMP_NUM_THREADS=2 python analysis/bench_steps.py            (≈ 1–2 min on 2 CPU cores)

All four strategies wrap copies of one backbone (a 19M-parameter Llama: hidden 512,
6 layers, so the linear layers dominate), train on the same batch, and their steps are
timed interleaved (round-robin, order rotated each round) so that machine-load drift hits
all of them alike. A step is forward + backward + AdamW step + zero_grad. The base is
bf16 (lora, peft_lora) or NF4 + double quant with bf16 compute (qlora, peft_qlora);
adapters are fp32 in both implementations. Prints median step ms (wall, and CPU time of
this process, which a shared machine's load disturbs less), tokens/s, measured
bytes (weights + quant_state + grads + AdamW state) and the ratios ours / PEFT.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
import copy
import statistics
import sys
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorabench.quant import quantize_backbone
from lorabench.memory import measured_bytes
from lorabench.strategies import build_strategy, strategy_class

PAIRS = [("lora", "peft_lora"), ("qlora", "peft_qlora")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512, help="model width (≥ 512 so linears dominate)")
    p.add_argument("--intermediate", type=int, default=1376, help="MLP width")
    p.add_argument("--layers", type=int, default=6, help="decoder blocks")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (all linears)")
    p.add_argument("--rounds", type=int, default=12, help="timed steps per strategy")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per strategy first")
    p.add_argument("--compute-dtype", default="bf16", help="4-bit matmul dtype")
    p.add_argument("--strategies", default="lora,qlora,peft_lora,peft_qlora", help="comma list")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return p.parse_args(argv)


def build(
    name: str, base: torch.nn.Module, args: argparse.Namespace
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Quantize (if the strategy asks) and wrap a copy of `base`; return model and optimizer."""
    node = {"name": name, "rank": args.rank, "alpha": 2.0 * args.rank, "target_modules": "all-linear"}
    keys = {f.name for f in fields(strategy_class(name).config_class)}
    if "compute_dtype" in keys:  # strategies over a quantized base: the 4-bit matmul dtype asked for
        node["compute_dtype"] = args.compute_dtype
    strategy = build_strategy(node, seed=0)
    model = copy.deepcopy(base)
    fmt = strategy.base_format()
    if fmt is not None:
        quantize_backbone(model, fmt)
    torch.manual_seed(0)  # same adapter init for ours and PEFT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = strategy.wrap(model)
    model.train()
    params = [p for _, p in strategy.trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return model, opt


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One training step: forward, backward, AdamW update, free the grads."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.strategies.split(",")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
    )
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in base.parameters())
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    runs = {n: build(n, base, args) for n in names}
    del base
    mem = {}
    for n, (model, opt) in runs.items():
        for _ in range(args.warmup):
            step(model, opt, batch)
        mem[n] = measured_bytes(model, opt)
    times: dict[str, list[float]] = {n: [] for n in names}  # wall seconds per step
    cpu: dict[str, list[float]] = {n: [] for n in names}  # CPU seconds of this process per step
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            model, opt = runs[n]
            c0, t0 = time.process_time(), time.perf_counter()
            step(model, opt, batch)
            cpu[n].append(time.process_time() - c0)
            times[n].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    med = {n: statistics.median(ts) for n, ts in times.items()}
    med_cpu = {n: statistics.median(ts) for n, ts in cpu.items()}
    print(
        f"backbone: Llama {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers), "
        f"batch {args.batch}x{args.seq}, r={args.rank} all linears, 4-bit: nf4+DQ {args.compute_dtype} compute, "
        f"threads {torch.get_num_threads()}, {args.rounds} interleaved steps each"
    )
    header = (
        f"{'strategy':<11} {'wall ms':>8} {'min ms':>8} {'max ms':>8} {'cpu ms':>8} "
        f"{'tokens/s':>9} {'measured B':>11}"
    )
    print(header)
    print("-" * len(header))
    for n in names:
        ts = times[n]
        print(
            f"{n:<11} {med[n] * 1e3:>8.1f} {min(ts) * 1e3:>8.1f} {max(ts) * 1e3:>8.1f} "
            f"{med_cpu[n] * 1e3:>8.1f} {tokens / med[n]:>9.0f} {mem[n]:>11d}"
        )
    for ours, ref in PAIRS:
        if ours in med and ref in med:
            print(
                f"{ours}/{ref}: wall {med[ours] / med[ref]:.3f}, cpu {med_cpu[ours] / med_cpu[ref]:.3f}, "
                f"measured bytes {mem[ours] / mem[ref]:.4f}"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
