"""Data-parallel training under ``torchrun`` (torch.distributed, DistributedDataParallel).

A process started by torchrun (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment, more than one
rank) joins the process group: NCCL on CUDA, one card per rank (``cuda:LOCAL_RANK``), gloo on the CPU. Every
rank runs the same trainer; what differs is written down here:

- the training images: each epoch's seeded order is cut into global batches (per-device batch x ranks),
  and rank r takes positions r, r + ranks, ... of each (``finetune.loader.shard_batches``): every image
  once per epoch across ranks, and the same images per optimizer step as one process with the global batch;
- validation: each rank evaluates every ranks-th image and the logits are gathered on every rank, so all
  ranks compute the same metrics and take the same early-stopping and best-checkpoint decisions;
- only rank 0 emits events and writes files (run.json, checkpoints with the same atomic switch).

Collectives time out after ``$FINETUNE_DIST_TIMEOUT`` seconds (default 600), so a rank that stops
answering ends the job instead of hanging the others; torchrun also ends every rank as soon as one exits
with an error. Work that rank 0 does alone while the others wait (the data pass, the final evaluation)
waits on a separate group with a long timeout.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "FINETUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 600.0
WAIT_TIMEOUT = timedelta(hours=24)  # rank 0 checks and stores a dataset alone: minutes to hours


def launched_ranks() -> int:
    """How many ranks torchrun started this process among (1 when it was not started by torchrun)."""
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        return 1
    return int(os.environ.get("WORLD_SIZE", "1"))


def collective_timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        raise ConfigError([f"{TIMEOUT_ENV} must be a number of seconds; got {raw!r}"]) from None
    return timedelta(seconds=max(1.0, seconds))


@dataclass
class Dist:
    """This process's place among the ranks (rank 0 of 1 when not distributed) and the helpers the trainer
    calls at the same points on every rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    _small: Any = None  # gloo group for small CPU-side collectives (stop flag, sums, gathered logits)
    _wait: Any = None  # gloo group with a long timeout, for waiting on rank 0's solo work

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"ranks": self.world, "backend": self.backend or "none"}

    def wait_for_main(self) -> None:
        """Every rank waits here until all reach it (rank 0 after its solo work)."""
        if self.enabled:
            dist.barrier(group=self._wait)

    def sync(self) -> None:
        if self.enabled:
            dist.barrier(group=self._small)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop asked for on any rank stops them all together)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._small)
        return bool(t.item())

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self._small)
        return t.tolist()

    def shard(self, n: int) -> list[int]:
        """This rank's share of n items for evaluation: every world-th one."""
        return list(range(self.rank, n, self.world))

    def gather_shards(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """The rows of every rank's ``shard(n)`` put back in order (on every rank)."""
        if not self.enabled:
            return part
        per = -(-n // self.world)
        padded = torch.zeros((per, *part.shape[1:]), dtype=part.dtype)
        padded[: len(part)] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self._small)
        out = torch.empty((n, *part.shape[1:]), dtype=part.dtype)
        for r, p in enumerate(parts):
            rows = len(range(r, n, self.world))
            out[r :: self.world] = p[:rows]
        return out

    def close(self) -> None:
        global _joined
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
        _joined = None


_joined: Dist | None = None


def setup(devices: int, device_name: str) -> Dist:
    """Join the process group when torchrun started this process, checking that it started as many ranks
    as the run asks for. A run for several devices started any other way is refused: ``finetune train
    --devices N`` (and the service's worker) start torchrun themselves."""
    ranks = launched_ranks()
    if ranks != devices:
        if ranks == 1:
            raise ConfigError(
                [
                    f"devices={devices} needs one process per device: start it with `finetune train --devices "
                    f"{devices}` or under torchrun --nproc-per-node {devices}"
                ]
            )
        raise ConfigError([f"the run asks for devices={devices} but torchrun started {ranks} processes"])
    if ranks == 1:
        return Dist()
    global _joined
    if _joined is not None and dist.is_initialized():
        return _joined  # the service's job process joins before fetching the run's files
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not cuda:
        raise ConfigError([f"device {device_name!r} was asked for but CUDA is not available"])
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(
                [f"devices={devices} but this host shows {torch.cuda.device_count()} CUDA device(s) to the job"]
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    timeout = collective_timeout()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    small = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    wait = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    log.info("rank %d of %d (%s), collective timeout %s", rank, ranks, backend, timeout)
    _joined = Dist(rank, ranks, local_rank, backend, small, wait)
    return _joined


def sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every batch-norm layer computing its statistics over all ranks' images (SyncBatchNorm;
    ``Runtime.for_config`` has refused it off CUDA). The weights and buffers keep their names, so checkpoints
    load into the plain architecture for evaluation and serving, where the running statistics are used and
    nothing is synchronised."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
