"""One run over several processes (`torchrun --nproc_per_node=N -m lorabench ...`) with DDP.

Every rank builds the same model, strategy and task from the same seed, and every rank builds
the same *global* batch of each step, then keeps its contiguous slice of it (`shard`). Each
rank's loss is weighted by its share of the global batch's loss tokens, so after DDP averages
the gradients the update is the single-process update of the global batch (same numbers up to
float summation order), whatever the padding. Rank 0 alone logs, evaluates, checkpoints and
writes the summary; all ranks read a checkpoint on resume. DDP is rebuilt at every phase start
(the trainable set may change) and broadcasts rank 0's weights then, so strategies that
re-initialise or merge weights (ReLoRA) keep all ranks identical.

Outside torchrun (no WORLD_SIZE > 1 in the environment) `SINGLE` does nothing at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lorabench.errors import ConfigError

IGNORE_INDEX = -100  # labels with this value take no loss (Hugging Face's convention)


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class DistContext:
    """This process's place in the run: rank `rank` of `world` processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates and writes the run dir."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's contiguous rows of the global batch (all of it on one process)."""
        if not self.active:
            return batch
        rows = next(iter(batch.values())).shape[0]
        per = rows // self.world
        return {k: v[self.rank * per : (self.rank + 1) * per] for k, v in batch.items()}

    def loss_weight(self, batch: dict[str, torch.Tensor], shard: dict[str, torch.Tensor]) -> float:
        """The factor that turns this shard's mean token loss into its part of the global batch's
        mean (tokens_shard / tokens_global), times `world` to undo DDP's gradient averaging."""
        if not self.active:
            return 1.0
        n_global = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        n_shard = int((shard["labels"][:, 1:] != IGNORE_INDEX).sum())
        return self.world * n_shard / max(1, n_global)

    def sum(self, value: float) -> float:
        """The sum of `value` over the ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def first_signal(self, signum: Optional[int]) -> Optional[int]:
        """A preemption signal seen by any rank, so that every rank stops at the same step."""
        if not self.active:
            return signum
        t = torch.tensor([signum or 0], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item()) or None

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP over `model`'s trainable parameters (frozen ones, quantized bases included, are
        left out); the model itself outside torchrun."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)  # buffers never change in training

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


SINGLE = DistContext()


def check_batch(batch_size: int, world: int) -> None:
    """A global batch that does not split evenly over the ranks is one line."""
    if batch_size % world:
        raise ConfigError(
            f"trainer.batch_size: {batch_size} sequences do not split over {world} processes; "
            f"use a multiple of {world} (it is the global batch of a step)"
        )


def check_strategy(strategy: Any, world: int) -> None:
    """A strategy that declares `supports_distributed = False` is refused under torchrun (one line)."""
    if world > 1 and not strategy.supports_distributed:
        raise ConfigError(
            f"strategy.name: strategy '{strategy.cfg.name}' cannot run distributed; "
            f"run it as one process (without torchrun), or pick another strategy"
        )


def start(device_name: str) -> tuple[DistContext, Optional[torch.device]]:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); (context, this rank's device or
    None to keep the configured one). Outside torchrun: (SINGLE, None)."""
    world = world_size_from_env()
    if world <= 1:
        return SINGLE, None
    import torch.distributed as dist

    cuda = device_name != "cpu" and torch.cuda.is_available()
    device = None
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size()), device


def stop(ctx: DistContext) -> None:
    """Leave the process group (after every rank has finished)."""
    if ctx.active and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
