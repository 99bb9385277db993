"""Loaded models for prediction: a bounded LRU cache of ``Predictor`` + micro-batcher per model.

A model is loaded once, off the event loop, however many requests ask for it at the same moment: the
first starts a loading task and the others await the same task. Forward passes run on one dedicated
thread for all models: on a CPU one forward already uses every core (more at once would only contend),
and on one GPU they serialise anyway. Decoding and cropping stay on the shared threadpool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.serving.batcher import MicroBatcher
from finetune.predict import Predictor

log = logging.getLogger(__name__)

Loader = Callable[[Path], Predictor]


def load_predictor(run_dir: Path) -> Predictor:
    return Predictor.from_run(run_dir, device="auto")


_threads_configured = threading.Lock()
_threads_done = False


def configure_cpu_threads() -> None:
    """Give torch one intra-op thread per CPU this process may run on (once per process).

    torch counts the machine's cores, which in a container limited by affinity is more than it can use;
    oversubscribed threads make every forward slower."""
    global _threads_done
    with _threads_configured:
        if _threads_done:
            return
        _threads_done = True
        try:
            usable = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            usable = os.cpu_count() or 1
        if torch.get_num_threads() > usable:
            torch.set_num_threads(max(1, usable))


FORWARD_NICE = 5


def lower_thread_priority(increment: int = FORWARD_NICE) -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread, and the OpenMP threads a thread
    starts inherit it). The forward thread uses every core; at nice 5 it still gets them when nothing else
    wants them, but the event loop thread (nice 0) is scheduled first, so health checks, uploads and other
    requests keep being answered under full prediction load. Training runs at nice 10, below both."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (AttributeError, OSError):  # not on Linux, or not allowed: run at the normal priority
        log.debug("could not lower the forward thread's priority", exc_info=True)


@dataclass
class LoadedModel:
    model_id: str
    predictor: Predictor
    batcher: MicroBatcher

    async def probabilities(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        return await self.batcher.submit(arrays)


class ModelCache:
    def __init__(
        self,
        capacity: int,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_pixels: int | None = None,
        loader: Loader = load_predictor,
        on_batch: Callable[[int], None] | None = None,
        on_load: Callable[[], None] | None = None,
    ) -> None:
        self.capacity = max(1, capacity)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_pixels = max_pixels
        self.loader = loader
        self.on_batch = on_batch
        self.on_load = on_load
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._discard: set[str] = set()  # evicted while loading: do not keep the result
        self._executor: ThreadPoolExecutor | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    async def get(self, model_id: str, run_dir: Path) -> LoadedModel:
        """The loaded model, loading it (once) if needed; most recently used is kept longest."""
        entry = self._entries.get(model_id)
        if entry is not None:
            self._entries.move_to_end(model_id)
            return entry
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(model_id, run_dir), name=f"load-{model_id}")
            task.add_done_callback(_retrieve_exception)
            self._loading[model_id] = task
        # Shielded: a request that goes away must not cancel the load the others wait for.
        return await asyncio.shield(task)

    async def _load(self, model_id: str, run_dir: Path) -> LoadedModel:
        try:
            predictor = await asyncio.get_running_loop().run_in_executor(None, self._load_blocking, run_dir)
        finally:
            self._loading.pop(model_id, None)
            discarded = model_id in self._discard
            self._discard.discard(model_id)
        entry = LoadedModel(
            model_id,
            predictor,
            MicroBatcher(
                predictor.probabilities,
                max_batch=self.max_batch,
                max_wait_s=self.max_wait_s,
                executor=self._forward_executor(),
                on_batch=self.on_batch,
            ),
        )
        if discarded:
            await entry.batcher.close()  # still answers the requests that were waiting, one by one
            return entry
        self._entries[model_id] = entry
        if self.on_load is not None:
            self.on_load()
        while len(self._entries) > self.capacity:
            _, old = self._entries.popitem(last=False)
            log.info("unloading model %s (cache holds %d)", old.model_id, self.capacity)
            self._close_later(old)
        return entry

    def _forward_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="predict-forward", initializer=lower_thread_priority
            )
        return self._executor

    def _load_blocking(self, run_dir: Path) -> Predictor:
        predictor = self.loader(run_dir)
        if predictor.device.type == "cpu":
            configure_cpu_threads()
        if self.max_pixels is not None:
            predictor.max_pixels = self.max_pixels
        return predictor

    def _close_later(self, entry: LoadedModel) -> None:
        # Requests already queued on the evicted model are still answered; closing waits for them.
        task = asyncio.get_running_loop().create_task(entry.batcher.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def evict(self, model_id: str) -> bool:
        """Unload a model (it was deleted); returns whether it was loaded or loading."""
        if model_id in self._loading:
            self._discard.add(model_id)
            return True
        entry = self._entries.pop(model_id, None)
        if entry is None:
            return False
        await entry.batcher.close()
        return True

    async def close(self) -> None:
        """Unload everything (at shutdown)."""
        entries = list(self._entries.values())
        self._entries.clear()
        for task in list(self._loading.values()):
            task.cancel()
        self._loading.clear()
        await asyncio.gather(*(e.batcher.close() for e in entries), *self._closing, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _retrieve_exception(task: asyncio.Task[LoadedModel]) -> None:
    # Every waiter may have gone away; the error was theirs to see, not the event loop's to log.
    if not task.cancelled():
        task.exception()
