"""Where and how a run computes (device, precision, memory layout), its seeds, and the line back to its
caller: events out, the cancel flag in."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import SYNC_BATCHNORM_NEEDS, TrainConfig
from .distributed import Dist, setup
from .errors import Cancelled, ConfigError
from .events import Callback, Event

StopFlag = Callable[[], bool]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "finetune"


def cache_root(config: TrainConfig) -> Path:
    """The folder of the caches a run fills (pixels, features, extracted zips)."""
    return Path(config.cache_dir) if config.cache_dir else default_cache_dir()


def seed_for(seed: int, *parts: object) -> int:
    """A reproducible 63-bit seed for one stage/epoch, independent of everything that ran before."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def raise_cancelled(stop: bool) -> None:
    if stop:
        raise Cancelled("training was cancelled; the last checkpoint is intact and can be resumed")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"device {name!r} was asked for but CUDA is not available"])
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(["precision fp16 needs CUDA; use bf16 or fp32 on the CPU"])
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32
    channels_last: bool
    callbacks: Sequence[Callback]
    should_stop: StopFlag
    started: float = field(default_factory=time.perf_counter)  # the run's elapsed time counts from here
    dist: Dist = field(default_factory=Dist)  # this process's rank among the run's processes

    @classmethod
    def for_config(cls, config: TrainConfig, callbacks: Sequence[Callback], should_stop: StopFlag | None) -> Runtime:
        dist = setup(config.devices, config.device)
        device = resolve_device(config.device)
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        if config.sync_batchnorm and dist.enabled and device.type != "cuda":
            raise ConfigError([f"sync_batchnorm {SYNC_BATCHNORM_NEEDS}; this run's ranks run on the {device.type}"])
        return cls(
            device,
            resolve_precision(config.precision, device),
            config.channels_last if config.channels_last is not None else True,
            list(callbacks),
            should_stop or (lambda: False),
            dist=dist,
        )

    def emit(self, event: Event) -> None:
        """Events come from rank 0 only: one run, one stream of progress."""
        if not self.dist.is_main:
            return
        for cb in self.callbacks:
            cb(event)

    def check_stop(self) -> None:
        raise_cancelled(self.should_stop())

    def check_stop_together(self) -> None:
        """``check_stop`` at a point every rank reaches together (each training batch): a stop asked for on
        any rank stops every rank at the same batch."""
        raise_cancelled(self.dist.any(self.should_stop()))

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed precision where asked for; on fp32 a context that does nothing, so there is one code path."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)
