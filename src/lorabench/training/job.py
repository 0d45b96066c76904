"""One job end to end: config → backbone (+ quant) → strategy → trainer → tracker.

The job builds the pieces in that order, hands them to the `Trainer`, and always leaves a
`summary.json` (completed, failed, interrupted or preempted) and a finished W&B run behind.
A preemption signal (SIGTERM/SIGUSR1/SIGUSR2) stops it at the next step boundary with a
checkpoint (`preempt`); under torchrun only rank 0 writes the run dir (`distributed`).
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from lorabench import memory, provenance
from lorabench.backbone import load_backbone
from lorabench.data import build_task
from lorabench.errors import ConfigError, Interrupted
from lorabench.quant import quantize_backbone
from lorabench.strategies import build_strategy
from lorabench.strategies.base import Strategy
from lorabench.tracking import Tracker
from lorabench.training import distributed
from lorabench.training import run_dir as run_dir_rules
from lorabench.training.distributed import SINGLE, DistContext
from lorabench.training.preempt import Preempted, PreemptionGuard
from lorabench.training.pretrain import prepare_backbone
from lorabench.training.trainer import Trainer
from lorabench.utils import seed_everything

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """auto → cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'cuda' asked for but no CUDA device is available")
    return torch.device(name)


def launch_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:
        return []


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job end to end; returns its summary (also written to summary.json, with the
    command-line `overrides` the job was launched with and the torch threads it used).

    A run dir that holds a completed run is not trained again (its summary is returned);
    `trainer.overwrite=true` clears it first. Ctrl-C ends the job as `interrupted` and raises
    `Interrupted` with the line that says how to resume; a preemption signal ends it as
    `preempted` (after a checkpoint at the next step boundary) and raises `Preempted`.
    Under torchrun every rank trains; rank 0 alone writes (the others return {"rank": r}).
    """
    world = distributed.world_size_from_env()
    strategy = build_strategy(cfg.strategy, seed=cfg.seed)
    distributed.check_strategy(strategy, world)
    distributed.check_batch(cfg.trainer.batch_size, world)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist, rank_device = distributed.start(cfg.trainer.device)
    if cfg.trainer.get("overwrite", False) and dist.is_main:
        run_dir_rules.clear(run_dir)
    dist.barrier()  # every rank sees the run dir as rank 0 left it
    done = run_dir_rules.completed_summary(run_dir)
    if done is not None:
        log.info("%s holds a completed run; not training it again (trainer.overwrite=true starts afresh)", run_dir)
        distributed.stop(dist)
        return {**done, "already_completed": True}
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = rank_device or pick_device(cfg.trainer.device)
    result = _run_main(cfg, device, strategy, dist, run_dir) if dist.is_main else _train_rank(cfg, device, strategy, dist, run_dir)
    distributed.stop(dist)  # after success only: a failed rank ends the run (torchrun stops the others)
    return result


def _run_main(cfg: DictConfig, device: torch.device, strategy: Strategy, dist: DistContext, run_dir: Path) -> dict[str, Any]:
    """The writing process (the only one outside torchrun): tracker, trainer, summary."""
    memory.reset_peak(device)
    tags = [f"strategy:{cfg.strategy.name}", f"seed:{cfg.seed}", f"task:{cfg.task.name}", *strategy.tags()]
    tracker = Tracker(cfg, run_dir, tags=tags, name=strategy.run_name(cfg.seed),
                      resume_step=run_dir_rules.checkpoint_step(run_dir))
    summary: dict[str, Any] = {
        "status": "running", "strategy": cfg.strategy.name, "seed": cfg.seed, "task": cfg.task.name,
        "overrides": launch_overrides(),
        "train/threads": torch.get_num_threads(),
    }
    if dist.active:
        summary["train/processes"] = dist.world
    trainer: Optional[Trainer] = None
    failed, preempted = True, False
    try:
        with PreemptionGuard() as guard:
            trainer = build_trainer(cfg, device, tracker, run_dir, strategy, started_at=time.perf_counter(),
                                    dist=dist, stop_requested=guard.requested)
            summary.update(prov := provenance.collect(cfg, trainer.model, trainer.data, device))
            tracker.add_config(prov)  # what produced the run: code, libraries, machine, backbone, data
            summary.update(_train(trainer))
        summary["status"] = "completed"
        (run_dir / "error.txt").unlink(missing_ok=True)  # an earlier attempt's error is history now
        failed = False
        return summary
    except Preempted as e:
        preempted = True
        summary.update(status="preempted", error=str(e), step=trainer.state.step if trainer else 0)
        raise
    except KeyboardInterrupt:
        last = run_dir_rules.checkpoint_step(run_dir)  # on disk: also right when stopped before the trainer resumed
        step = max(trainer.state.step if trainer else 0, last or 0)
        summary.update(status="interrupted", error=f"interrupted at step {step}", step=step)
        where = f"the last checkpoint is step {last} in {run_dir}" if last is not None else "no checkpoint was written yet"
        raise Interrupted(f"interrupted at step {step}; {where}") from None
    except BaseException as e:
        summary["status"] = "failed"
        summary["error"] = f"{type(e).__name__}: {e}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    finally:
        tracker.write_summary(summary)
        tracker.finish(failed, preempted=preempted)


def _train_rank(cfg: DictConfig, device: torch.device, strategy: Strategy, dist: DistContext, run_dir: Path) -> dict[str, Any]:
    """A rank other than 0 under torchrun: the same steps on its shard, nothing written."""
    with PreemptionGuard() as guard:
        trainer = build_trainer(cfg, device, None, run_dir, strategy, dist=dist, stop_requested=guard.requested)
        trainer.setup()
        trainer.fit()
    return {"rank": dist.rank, "train/steps": trainer.state.step}


def wrap_model(strategy: Strategy, model: torch.nn.Module, seed: int, quantize: bool = True) -> torch.nn.Module:
    """Quantize the backbone to the strategy's base format (unless `quantize=False`: it was
    quantized while loading), then let the strategy wrap it.

    Adapter init depends on the seed only, not on backbone loading; a strategy that fails
    while wrapping is reported in one line naming it.
    """
    fmt = strategy.base_format()
    if fmt is not None and quantize:
        quantize_backbone(model, fmt)
    seed_everything(seed)
    try:
        return strategy.wrap(model)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"strategy.name: strategy '{strategy.cfg.name}' failed in wrap: {type(e).__name__}: {e}") from e


def build_trainer(
    cfg: DictConfig, device: torch.device, tracker: Optional[Tracker] = None, run_dir: Optional[Path] = None,
    strategy: Optional[Strategy] = None, started_at: Optional[float] = None, dist: DistContext = SINGLE,
    stop_requested: Optional[Any] = None,
) -> Trainer:
    """Backbone (+ quant) → strategy → task → Trainer, in the order that fixes every RNG draw
    (the trainer is not set up yet: call `setup()`, which also resumes from `run_dir`)."""
    strategy = strategy or build_strategy(cfg.strategy, seed=cfg.seed)
    prepare_backbone(cfg.model, device)
    seed_everything(cfg.seed)
    model, tok = load_backbone(cfg.model, cfg.seed, device, strategy.base_format())  # quantized while loading
    model = wrap_model(strategy, model, cfg.seed, quantize=False)
    model.to(device)
    data = build_task(cfg.task, tok, cfg.seed)
    acct = memory.account_model(model)  # logged now; the summary's figures are taken after the first step
    log.info(
        "run dir %s | base %d (quantized %d), trainable %d, expected %d B",
        run_dir, acct.base_params, acct.base_quantized, acct.trainable_params, int(acct.expected_bytes),
    )
    return Trainer(
        model, strategy, data, cfg.optim, cfg.trainer, device, tracker=tracker, run_dir=run_dir,
        generate=cfg.task.generate, desc=strategy.run_name(cfg.seed), started_at=started_at,
        config=run_dir_rules.config_record(cfg), dist=dist, stop_requested=stop_requested,
    )


def _train(trainer: Trainer) -> dict[str, Any]:
    """Fit, score the merged model, write the artifacts; returns the summary's figures."""
    model, strategy, run_dir, device = trainer.model, trainer.strategy, trainer.run_dir, trainer.device
    peaks = memory.phase_peaks(device, "load")  # since job start: loading, quantizing, wrapping the backbone
    memory.reset_peak(device)
    trainer.setup()
    final = trainer.fit()
    peaks.update(memory.phase_peaks(device, "train"))  # optimizer, base eval, the steps, final eval

    end: dict[str, Any] = {f"eval/{k}": v for k, v in final.items()}
    memory.reset_peak(device)
    merged = strategy.merged_for_eval(model, run_dir)
    if merged is not None:
        end.update({f"eval/{k}_merged": v for k, v in trainer.evaluate(merged).items()})
        del merged
        peaks.update(memory.phase_peaks(device, "merge"))  # merging and scoring the merged model
    end.update(strategy.final_metrics(model))
    trainer.tracker.log(end, step=trainer.state.step)
    strategy.save_artifacts(model, run_dir)

    st = trainer.state
    return {
        **st.measured,
        **peaks,
        **{f"eval/{k}_base": v for k, v in st.base_eval.items()},
        **end,
        "train/steps": st.step,
        "train/tokens": st.tokens,
        "train/wall_seconds": round(trainer.wall_seconds(), 3),
        "train/train_seconds": round(st.train_seconds, 3),
        "train/tokens_per_second": trainer.tokens_per_second(),
        "device": str(device),
        **{f"strategy/{k}": v for k, v in strategy.identity().items()},
    }
