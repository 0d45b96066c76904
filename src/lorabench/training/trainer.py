"""The training loop, in named phases: set up, resume, step, evaluate, checkpoint, fit.

It never branches on a strategy's name: the strategy wraps the model, names its trainable
set for each of its phases, scales the lr, and hooks into steps. The optimizer and schedule
are (re)built in one place, `start_phase`, at step 0 and wherever the strategy says its
trainable set changes. One checkpoint dict holds everything needed to resume (strategy
tensors, optimizer, scheduler, RNG, counters), so a run resumed in the same run dir ends with
the numbers of an uninterrupted one. Fine-tuning jobs and the tiny backbone's pretraining
both run through this class.

Between steps it asks `stop_requested` (a preemption signal or Ctrl-C, see `preempt`): if set,
it writes a checkpoint and raises `Preempted` (`Interrupted` for Ctrl-C). Under torchrun
(`distributed.DistContext`) each rank trains on its shard of the global batch through DDP, and only rank 0 evaluates and checkpoints.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from lorabench import memory
from lorabench.data.tasks import TaskData
from lorabench.errors import ConfigError, Interrupted
from lorabench.evaluate import evaluate
from lorabench.strategies.base import Strategy
from lorabench.training.distributed import SINGLE, DistContext
from lorabench.training.optimizer import build_optimizer, build_scheduler
from lorabench.training.preempt import Preempted, deferred_interrupts, interruptible
from lorabench.training.run_dir import CHECKPOINT, check_same_config
from lorabench.utils import atomic_torch_save

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters a resumed run continues from (saved in every checkpoint)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen (attention-mask sum)
    train_seconds: float = 0.0  # time inside training steps
    prior_wall: float = 0.0  # wall time of earlier (interrupted) attempts
    measured: dict[str, Any] = field(default_factory=dict)  # memory figures of the current phase
    base_eval: Optional[dict[str, float]] = None  # the score before training


class Trainer:
    """One model, one strategy, one task: `fit()` runs it all; tests drive `train_step()`."""

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        data: TaskData,
        optim_cfg: Any,
        trainer_cfg: Any,
        device: torch.device,
        tracker: Optional[Any] = None,
        run_dir: Optional[Path] = None,
        generate: bool = True,
        desc: str = "",
        started_at: Optional[float] = None,
        config: Optional[dict[str, Any]] = None,
        dist: DistContext = SINGLE,
        stop_requested: Optional[Callable[[], Optional[int]]] = None,
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.data = data
        self.optim_cfg = optim_cfg
        self.cfg = trainer_cfg
        self.device = device
        self.tracker = tracker
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.generate = generate
        self.desc = desc
        self.config = config  # the resolved config a checkpoint records and a resume must match
        self.last_checkpoint: Optional[int] = None  # step of the newest checkpoint in the run dir
        self.dist = dist  # this process's rank in a torchrun run (SINGLE otherwise)
        self.stop_requested = stop_requested or (lambda: None)  # a preemption signal number, checked between steps
        self.forward_model: nn.Module = model  # what forward/backward run through (DDP around `model` under torchrun)
        self.state = TrainState()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
        self._wall_start = time.perf_counter() if started_at is None else started_at  # job start, for wall time

    # ---- set up ---------------------------------------------------------------------------------
    def phase_start(self, step: int) -> int:
        """The step at which the phase containing `step` began."""
        return max(s for s in self.strategy.phase_starts() if s <= step)

    def start_phase(self, step: int) -> None:
        """Apply the strategy's phase for `step` and build AdamW + schedule over its trainable set.

        The only place an optimizer is created: at set-up, at a phase boundary, and on resume.
        """
        self.strategy.apply_phase(self.model, step)
        params = [p for _, p in self.strategy.trainable_parameters(self.model)]
        self.optimizer = build_optimizer(self.optim_cfg, params)
        self.forward_model = self.dist.wrap(self.model, self.device)  # DDP over this phase's trainable set
        self.scheduler = build_scheduler(
            self.optim_cfg, self.cfg.max_steps, self.optimizer, self.phase_start(step), self.strategy.lr_scale
        )

    def setup(self) -> None:
        """Optimizer and schedule for step 0, then resume if the run dir holds a checkpoint."""
        self.start_phase(0)
        self.resume()

    # ---- resume ---------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.run_dir is None else self.run_dir / CHECKPOINT

    def resume(self) -> bool:
        """Load the run dir's checkpoint, if any: everything a later step depends on."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # a torn or foreign file: say so, overwrite nothing
            raise ConfigError(
                f"{path}: cannot read this checkpoint ({type(e).__name__}); move it away or set trainer.overwrite=true"
            ) from None
        if self.config is not None and "config" in ckpt:
            check_same_config(ckpt["config"], self.config, path)
        self.state = TrainState(**ckpt["state"])
        self.start_phase(self.state.step)  # the phase's trainable set and a fresh optimizer over it
        self.strategy.load_state_dict(self.model, ckpt["strategy"])  # in place: the optimizer keeps its params
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"].cpu())
        if self.device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
        self._wall_start = time.perf_counter()
        self.last_checkpoint = self.state.step
        if self.tracker is not None:
            self.tracker.truncate_after(self.state.step)
        log.info("resumed from %s at step %d", path, self.state.step)
        return True

    # ---- step -----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step (with its micro-batches); returns the step's metrics."""
        st, tc = self.state, self.cfg
        step = st.step
        self.model.train()
        t0 = time.perf_counter()
        loss_sum = 0.0
        activations = None
        for micro in range(tc.grad_accum_steps):
            batch = self.data.train_batch(step * tc.grad_accum_steps + micro, tc.batch_size)  # the global batch
            batch = {k: v.to(self.device) for k, v in batch.items()}
            shard = self.dist.shard(batch)
            weight = self.dist.loss_weight(batch, shard) / tc.grad_accum_steps
            losses: list[torch.Tensor] = []

            def forward_backward() -> None:
                mean = self.forward_model(**shard).loss  # over this rank's loss tokens
                loss = mean * weight if self.dist.active else mean / tc.grad_accum_steps
                loss.backward()
                losses.append(loss / self.dist.world)

            if micro == 0 and not st.measured:  # the phase's first step: count what autograd saves
                activations = memory.activation_bytes(self.model, forward_backward)
            else:
                forward_backward()
            loss_sum += losses[0].item()
            st.tokens += int(batch["attention_mask"].sum())
        loss_sum = self.dist.sum(loss_sum)  # the global batch's loss
        opt = self.optimizer
        grad_norm = None
        if self.optim_cfg.max_grad_norm > 0:
            params = [p for group in opt.param_groups for p in group["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        self.scheduler.step()
        if not st.measured:  # after the first optimizer step (of a phase): grads and moments exist
            st.measured = {**self.memory_figures(), "memory/activation_bytes": activations}
        opt.zero_grad(set_to_none=True)
        st.train_seconds += time.perf_counter() - t0
        st.step = step = step + 1
        metrics: dict[str, Any] = {"train/loss": loss_sum, "train/lr": lr}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(self.strategy.on_step_end(step, self.model, opt))
        if step in self.strategy.phase_starts():  # the next step belongs to a new phase
            self.start_phase(step)
            st.measured = {}  # the trainable set changed: measure the new phase's memory
        return metrics

    def memory_figures(self) -> dict[str, Any]:
        """Formula, expected and measured bytes and parameter counts, as the model is now."""
        now = memory.account_model(self.model)  # the trainable set may differ from wrap time (warm starts)
        return {
            "memory/measured_bytes": memory.measured_bytes(self.model, self.optimizer),
            "memory/expected_bytes": int(now.expected_bytes),
            "memory/formula_bytes": self.strategy.formula_bytes(now.base_params, now.trainable_params),
            **{f"memory/measured_{k}_bytes": v for k, v in memory.measured_breakdown(self.model, self.optimizer).items()},
            "params/base": now.base_params,
            "params/base_quantized": now.base_quantized,
            "params/trainable": now.trainable_params,
        }

    # ---- evaluate -------------------------------------------------------------------------------
    def evaluate(self, model: Optional[nn.Module] = None) -> dict[str, float]:
        """Score `model` (default: the one training) on the task's eval split (rank 0 only: {} elsewhere)."""
        if not self.dist.is_main:
            return {}
        return evaluate(model or self.model, self.data, self.cfg.eval_batch_size, self.device, generate=self.generate)

    # ---- checkpoint -----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Everything `resume` needs, written atomically into the run dir."""
        st = self.state
        st.prior_wall += time.perf_counter() - self._wall_start
        self._wall_start = time.perf_counter()
        ckpt = {
            "strategy": self.strategy.state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "state": asdict(st),
        }
        if self.config is not None:
            ckpt["config"] = self.config
        if self.device.type == "cuda":
            ckpt["cuda_rng"] = torch.cuda.get_rng_state()
        if self.dist.is_main:
            atomic_torch_save(ckpt, self.checkpoint_path)
        self.dist.barrier()  # no rank runs ahead of a checkpoint it may have to resume from
        self.last_checkpoint = st.step

    # ---- fit ------------------------------------------------------------------------------------
    def _log(self, metrics: dict[str, Any], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(metrics, step=step)

    def fit(self) -> dict[str, float]:
        """Score the base, train to `max_steps` (logging, evaluating and checkpointing on their
        cadences) and return the final score.

        SIGINT inside a step, a log line or a checkpoint write is deferred to the next step
        boundary (a checkpoint is never half-written, a step never torn); evaluations stay
        interruptible, since a long one has no step boundary soon (`preempt`)."""
        st, tc = self.state, self.cfg
        with deferred_interrupts():
            if st.base_eval is None:
                with interruptible():
                    st.base_eval = self.evaluate()
                self._log({f"eval/{k}": v for k, v in st.base_eval.items()}, step=0)
            bar = tqdm(total=tc.max_steps, initial=st.step, desc=self.desc, disable=not (tc.progress and self.dist.is_main))
            while st.step < tc.max_steps:
                signum = self.dist.first_signal(self.stop_requested())
                if signum is not None:  # a step boundary: everything up to st.step is logged
                    bar.close()
                    self.stop_for_preemption(signum)
                metrics = self.train_step()
                step = st.step
                if step % max(1, tc.log_every) == 0 or step == tc.max_steps or len(metrics) > 3:
                    metrics["train/tokens_per_second"] = self.tokens_per_second()
                    metrics["train/wall_seconds"] = self.wall_seconds()  # elapsed, evaluations included: curves vs wall time
                    self._log(metrics, step)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
                if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                    with interruptible():
                        scores = self.evaluate()
                    self._log({f"eval/{k}": v for k, v in scores.items()}, step)
                if self.run_dir is not None and tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.max_steps:
                    self.save_checkpoint()
            bar.close()
            if self.dist.first_signal(self.stop_requested()) == signal.SIGINT:  # Ctrl-C in the last step: stop here too
                self.stop_for_preemption(signal.SIGINT)
        with interruptible():
            return self.evaluate()

    def stop_for_preemption(self, signum: int) -> None:
        """Checkpoint at this step boundary (unless one was just written) and raise `Preempted`
        (`Interrupted` for SIGINT: Ctrl-C stops the job, nothing requeues it)."""
        name = signal.Signals(signum).name
        step = self.state.step
        stop = Interrupted if signum == signal.SIGINT else partial(Preempted, signum=signum)
        if self.run_dir is None:
            raise stop(f"stopped by {name} at step {step}; no run dir, nothing saved")
        if self.last_checkpoint != step:
            self.save_checkpoint()
        raise stop(f"stopped by {name} at step {step}; checkpoint at step {step} in {self.run_dir}")

    def tokens_per_second(self) -> float:
        return self.state.tokens / max(1e-9, self.state.train_seconds)

    def wall_seconds(self) -> float:
        """Wall time of this run, earlier interrupted attempts included."""
        return self.state.prior_wall + time.perf_counter() - self._wall_start
