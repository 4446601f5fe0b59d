"""Devices, distribution and the training loop shared by both tasks.

One process on CPU here; CUDA with mixed precision (bf16 autocast, or fp16 with a gradient
scaler where bf16 is missing) when present; several processes with `torchrun` (environment
variables WORLD_SIZE/RANK/LOCAL_RANK) wrap the model in DistributedDataParallel — NCCL on
GPUs, gloo on CPU. Seeds are set everywhere, and every rank logs the same epoch losses
(averaged with all-reduce), so the loss curve is the global one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from training.config import OptimConfig

log = logging.getLogger("usv.training")


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        from usv.errors import ConfigError

        raise ConfigError(f"run.device={pref!r} but CUDA is not available here; use auto or cpu")
    return torch.device(f"cuda:{local_rank}" if pref == "cuda" else pref)


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (or spawn with the same env), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's value on every rank (e.g. a run folder name made from the clock)."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


Stream = Callable[[int], tuple[Iterator[dict[str, Any]], int]]  # epoch -> (batches, steps)
LossFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]


def fit(model: nn.Module, loss_fn: LossFn, stream: Stream, optim: OptimConfig, d: Dist, amp: bool,
        label: str) -> list[float]:
    """AdamW with a cosine schedule; returns the mean training loss of every epoch (all ranks)."""
    model.to(d.device)
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                  else None)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    use_scaler = amp and d.device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    history: list[float] = []
    total_steps: int | None = None
    step = 0
    for epoch in range(optim.epochs):
        batches, steps = stream(epoch)
        total_steps = total_steps or steps * optim.epochs
        net.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=d.device)
        for batch in batches:
            for g in opt.param_groups:
                g["lr"] = optim.lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
            batch = to_device(batch, d.device)
            with autocast(d.device, amp):
                loss = loss_fn(net, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += torch.tensor([loss.item() * len(batch["__key__"]), len(batch["__key__"])],
                                     dtype=torch.float64, device=d.device)
            step += 1
        if d.world > 1:
            dist.all_reduce(loss_sum)
        history.append(float(loss_sum[0] / max(loss_sum[1], 1)))
        if d.main:
            log.info("%s epoch %d/%d loss %.4f", label, epoch + 1, optim.epochs, history[-1])
    model.eval()
    return history
