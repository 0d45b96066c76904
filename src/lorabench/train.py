"""The training loop, read top to bottom: config → backbone → strategy → trainer → tracker.

It never branches on a strategy's name: the strategy declares its base format, wraps the
model, names its trainable parameters and hooks into steps. One checkpoint dict holds
everything needed to resume (strategy tensors, optimizer, scheduler, RNG, counters), so a
job rerun into the same run dir ends with the numbers an uninterrupted one would.
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from lorabench import memory
from lorabench.backbone import quantize_backbone
from lorabench.backbone.load import load_backbone
from lorabench.data import build_task
from lorabench.evaluate import evaluate
from lorabench.schedules import build_schedule
from lorabench.strategies import build_strategy
from lorabench.strategies.base import Strategy
from lorabench.tracking import Tracker
from lorabench.utils import atomic_torch_save, seed_everything

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


def pick_device(name: str) -> torch.device:
    """auto → cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from lorabench.errors import ConfigError

        raise ConfigError("trainer.device: 'cuda' asked for but no CUDA device is available")
    return torch.device(name)


def build_optimizer(cfg: DictConfig, strategy: Strategy, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over exactly the strategy's trainable parameters."""
    params = [p for _, p in strategy.trainable_parameters(model)]
    o = cfg.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_scheduler(
    cfg: DictConfig, opt: torch.optim.Optimizer, strategy: Strategy
) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured schedule times the strategy's per-phase factor."""
    schedule = build_schedule(cfg.optim, cfg.trainer.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) * strategy.lr_scale(s))


def run_name(cfg: DictConfig) -> str:
    """strategy-r<rank>-seed<seed>: readable in a W&B table."""
    rank = cfg.strategy.get("rank")
    return f"{cfg.strategy.name}" + (f"-r{rank}" if rank else "") + f"-seed{cfg.seed}"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job end to end; returns its summary (also written to summary.json)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.trainer
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device)
    memory.reset_peak(device)
    tags = [f"strategy:{cfg.strategy.name}", f"seed:{cfg.seed}", f"task:{cfg.task.name}"]
    if cfg.strategy.get("rank"):
        tags.append(f"rank:{cfg.strategy.rank}")
    tracker = Tracker(cfg, run_dir, tags=tags, name=run_name(cfg))
    summary: dict[str, Any] = {"status": "running", "strategy": cfg.strategy.name, "seed": cfg.seed}
    failed = True
    try:
        summary.update(_train(cfg, run_dir, device, tracker))
        summary["status"] = "completed"
        failed = False
        return summary
    except BaseException as e:
        summary["status"] = "failed"
        summary["error"] = f"{type(e).__name__}: {e}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    finally:
        tracker.write_summary(summary)
        tracker.finish(failed)


def _train(cfg: DictConfig, run_dir: Path, device: torch.device, tracker: Tracker) -> dict[str, Any]:
    tc = cfg.trainer
    job_start = time.perf_counter()
    seed_everything(cfg.seed)
    # 1. backbone, quantized to the format the strategy declares, then wrapped
    strategy = build_strategy(cfg.strategy, seed=cfg.seed)
    model, tok = load_backbone(cfg.model, cfg.seed, device)
    fmt = strategy.base_format()
    if fmt is not None:
        quantize_backbone(model, fmt)
    seed_everything(cfg.seed)  # adapter init depends on the seed only, not on backbone loading
    model = strategy.wrap(model)
    model.to(device)
    data = build_task(cfg.task, tok, cfg.seed)
    acct = memory.account_model(model)  # logged now; the summary's figures are taken after the first step
    log.info(
        "run dir %s | base %d (quantized %d), trainable %d, expected %d B",
        run_dir, acct.base_params, acct.base_quantized, acct.trainable_params, int(acct.expected_bytes),
    )

    opt = build_optimizer(cfg, strategy, model)
    sched = build_scheduler(cfg, opt, strategy)
    state: dict[str, Any] = {
        "step": 0, "tokens": 0, "train_seconds": 0.0, "prior_wall": 0.0, "measured": {}, "base_eval": None,
    }

    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():  # resume: everything a later step depends on comes from the checkpoint
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        strategy.load_state_dict(model, ckpt["strategy"])
        opt = build_optimizer(cfg, strategy, model)
        sched = build_scheduler(cfg, opt, strategy)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
        state = ckpt["state"]
        job_start = time.perf_counter()
        tracker.truncate_after(state["step"])
        log.info("resumed from %s at step %d", ckpt_path, state["step"])

    def evaluate_now(m: torch.nn.Module) -> dict[str, float]:
        return evaluate(m, data, tc.eval_batch_size, device, generate=cfg.task.generate)

    if state["base_eval"] is None:
        base = evaluate_now(model)
        state["base_eval"] = base
        tracker.log({f"eval/{k}": v for k, v in base.items()}, step=0)

    model.train()
    bar = tqdm(total=tc.max_steps, initial=state["step"], desc=run_name(cfg), disable=not tc.progress)
    last_eval: dict[str, float] = dict(state["base_eval"])
    while state["step"] < tc.max_steps:
        step = state["step"]
        if step > 0 and strategy.rebuild_optimizer_at(step):
            opt = build_optimizer(cfg, strategy, model)
            sched = build_scheduler(cfg, opt, strategy)
            sched.last_epoch = step - 1
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
            state["measured"] = {}  # the trainable set changed: measure the new phase's memory
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(tc.grad_accum_steps):
            batch = data.train_batch(step * tc.grad_accum_steps + micro, tc.batch_size)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss / tc.grad_accum_steps
            loss.backward()
            loss_sum += loss.item()
            state["tokens"] += int(batch["attention_mask"].sum())
        grad_norm = None
        if cfg.optim.max_grad_norm > 0:
            params = [p for group in opt.param_groups for p in group["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        if not state["measured"]:  # after the first optimizer step (of a phase): grads and moments exist
            now = memory.account_model(model)  # the trainable set may differ from wrap time (warm starts)
            state["measured"] = {
                "memory/measured_bytes": memory.measured_bytes(model, opt),
                "memory/expected_bytes": int(now.expected_bytes),
                "memory/formula_bytes": strategy.formula_bytes(now.base_params, now.trainable_params),
                "params/base": now.base_params,
                "params/base_quantized": now.base_quantized,
                "params/trainable": now.trainable_params,
            }
        opt.zero_grad(set_to_none=True)
        state["train_seconds"] += time.perf_counter() - t0
        state["step"] = step = step + 1
        metrics: dict[str, Any] = {"train/loss": loss_sum, "train/lr": lr}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(strategy.on_step_end(step, model, opt))
        if step % max(1, tc.log_every) == 0 or step == tc.max_steps or len(metrics) > 3:
            metrics["train/tokens_per_second"] = state["tokens"] / max(1e-9, state["train_seconds"])
            tracker.log(metrics, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
            last_eval = evaluate_now(model)
            tracker.log({f"eval/{k}": v for k, v in last_eval.items()}, step=step)
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.max_steps:
            state["prior_wall"] += time.perf_counter() - job_start
            job_start = time.perf_counter()
            ckpt = {
                "strategy": strategy.state_dict(model),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "state": state,
            }
            if device.type == "cuda":
                ckpt["cuda_rng"] = torch.cuda.get_rng_state()
            atomic_torch_save(ckpt, run_dir / CHECKPOINT)
    bar.close()

    final = evaluate_now(model)
    end: dict[str, Any] = {f"eval/{k}": v for k, v in final.items()}
    merged = strategy.merged_for_eval(model, run_dir)
    if merged is not None:
        merged_eval = evaluate_now(merged)
        end.update({f"eval/{k}_merged": v for k, v in merged_eval.items()})
        del merged
    end.update(strategy.final_metrics(model))
    tracker.log(end, step=state["step"])
    strategy.save_artifacts(model, run_dir)

    base = state["base_eval"]
    summary = {
        **state["measured"],
        "memory/peak_bytes": memory.peak_bytes(device),
        **{f"eval/{k}_base": v for k, v in base.items()},
        **end,
        "train/steps": state["step"],
        "train/tokens": state["tokens"],
        "train/wall_seconds": round(state["prior_wall"] + time.perf_counter() - job_start, 3),
        "train/train_seconds": round(state["train_seconds"], 3),
        "train/tokens_per_second": state["tokens"] / max(1e-9, state["train_seconds"]),
        "task": cfg.task.name,
        "device": str(device),
    }
    for k in ("rank", "alpha", "bits", "group_size", "quant_type", "pooling", "merge", "merge_bits", "base",
              "reset_every", "warm_start_steps"):
        if k in cfg.strategy:
            summary[f"strategy/{k}"] = cfg.strategy[k]
    return summary
