"""Rank of ReLoRA's accumulated update, recomputed from a finished run's saved factors.

Run: python analysis/relora_rank.py outputs/capacity/cells      (any run or sweep dirs; seconds)
Needs runs with strategy.keep_factors=true (the relora_capacity and relora_table2 cells set it).

ReLoRA's point is that Σ_k s·B_k@A_k, a sum of K rank-r updates, can reach rank K·r. The strategy
logs the numerical rank of that sum at the end of a run (relora/update_rank_mean, from the stacked
factors through a QR trick). This script recomputes it independently, densely: it loads each
run's relora_factors.pt (the merged factors (B_k, s·A_k) of every adapted linear, plus the current
cycle's B, A, scaled by α/r from the run's config), forms ΔW as a dense matrix, takes its
singular values σ and reports, per run, the mean over layers of
- the numerical rank at fp32 precision (σ > σ₁·max(m, n)·eps₃₂), the strategy's own rule, which it
  must reproduce (the script says so when it does not);
- the 99%-energy rank (fewest σ holding 99% of Σσ²) and the count of σ > 1% of σ₁, which ignore
  directions too small to matter — the rank "exceeds r" only where these do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

FP32_EPS = torch.finfo(torch.float32).eps
FACTORS = "relora_factors.pt"  # written by the strategy with keep_factors (strategies/relora.py FACTORS_FILE)


def accumulated_update(state: dict, name: str, scaling: float) -> torch.Tensor:
    """Σ merged B_k@(s·A_k) + the current cycle's s·B@A, dense, in float64."""
    delta = None
    for b, sa in state["factors"].get(name, []):
        term = b.double() @ sa.double()
        delta = term if delta is None else delta + term
    cur = state["adapters"][name]
    term = scaling * cur["B"].double() @ cur["A"].double()
    return term if delta is None else delta + term


def ranks(delta: torch.Tensor) -> dict[str, float]:
    s = torch.linalg.svdvals(delta)
    if s.numel() == 0 or s[0] == 0:
        return {"numerical": 0, "energy99": 0, "above1pct": 0}
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    return {
        "numerical": int((s > s[0] * max(delta.shape) * FP32_EPS).sum()),
        "energy99": int((energy < 0.99).sum()) + 1,
        "above1pct": int((s > 0.01 * s[0]).sum()),
    }


def run_ranks(run_dir: Path) -> dict[str, object] | None:
    """Mean ranks over the adapted layers of one ReLoRA run (None for other strategies)."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    if cfg.strategy.name != "relora" or not (run_dir / FACTORS).exists():
        return None
    state = torch.load(run_dir / FACTORS, map_location="cpu", weights_only=True)
    scaling = float(cfg.strategy.alpha) / int(cfg.strategy.rank)
    per_layer = [ranks(accumulated_update(state, n, scaling)) for n in state["adapters"]]
    out: dict[str, object] = {"run": run_dir.name, "rank": int(cfg.strategy.rank),
                              "merges": int(state["merges"]), "layers": len(per_layer)}
    for key in ("numerical", "energy99", "above1pct"):
        out[key] = sum(r[key] for r in per_layer) / len(per_layer)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    out["logged"] = summary.get("relora/update_rank_mean")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", type=Path, help="run or sweep dirs")
    args = ap.parse_args(argv)
    rows = [r for src in args.sources for d in sorted({p.parent for p in src.rglob(FACTORS)})
            if (r := run_ranks(d)) is not None]
    if not rows:
        print(f"relora_rank: no {FACTORS} (a finished ReLoRA run with strategy.keep_factors=true) under "
              f"{[str(s) for s in args.sources]}", file=sys.stderr)
        return 1
    print("| run | r | merges | numerical rank (fp32) | logged by the strategy | 99%-energy rank | σ > 1% σ₁ |")
    print("|---|---|---|---|---|---|---|")
    mismatch = 0
    for r in rows:
        same = r["logged"] is not None and abs(float(r["logged"]) - float(r["numerical"])) < 1e-9
        mismatch += not same
        print(f"| {r['run']} | {r['rank']} | {r['merges']} | {r['numerical']:.2f} | {r['logged']} | "
              f"{r['energy99']:.2f} | {r['above1pct']:.2f} |")
    if mismatch:
        print(f"relora_rank: {mismatch} run(s) whose recomputed numerical rank differs from the logged one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
