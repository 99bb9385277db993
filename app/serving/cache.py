"""Loaded models for prediction: a bounded LRU cache of ``Predictor`` + runtime + micro-batcher per model.

A model is loaded once, off the event loop, however many requests ask for it at the same moment: the
first starts a loading task and the others await the same task. Forward passes run on one dedicated
thread for all models: on a CPU one forward already uses every core (more at once would only contend),
and on one GPU they serialise anyway. Decoding and cropping stay on the shared threadpool.

A model answers at once with PyTorch (channels-last); after its first answer, on a low-priority thread, its
runtime is chosen (``finetune.serving``: the ONNX export made and parity-checked if needed, then PyTorch eager,
channels-last, torch.compile when enabled and ONNX Runtime measured on the forward thread, where nothing
competes with the measurement) and the batcher switches to the winner. The choice is recorded in the run
folder, so the next process on the same kind of host reuses it without measuring.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from app.serving.batcher import MicroBatcher
from finetune.predict import Predictor
from finetune.serving import (
    TORCH_CHANNELS_LAST,
    Choice,
    batch_forward,
    choose,
    prepare,
    torch_runtime,
    usable_cpus,
)

log = logging.getLogger(__name__)

Loader = Callable[[Path], Predictor]


def load_predictor(run_dir: Path) -> Predictor:
    return Predictor.from_run(run_dir, device="auto")


_threads_configured = threading.Lock()
_threads_done = False


def configure_cpu_threads(threads: int | None = None) -> None:
    """Give torch ``threads`` intra-op threads, by default one per CPU this process may run on (once per
    process).

    torch counts the machine's cores, which in a container limited by affinity is more than it can use;
    oversubscribed threads make every forward slower. With several API processes on one machine, give
    each its share (``FINETUNE_PREDICT_THREADS``)."""
    global _threads_done
    with _threads_configured:
        if _threads_done:
            return
        _threads_done = True
        usable = threads or usable_cpus()
        if torch.get_num_threads() > usable or threads:
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


PREPARE_NICE = 10  # as low as training: choosing a runtime must not slow the requests being answered
MEASURE_BATCH = 8  # the batch the runtimes are compared at: what the batcher forms under load


def batch_cap(choice: Choice, max_batch: int, batch_s: float | None) -> int:
    """The most images one forward pass of ``choice`` takes: as many as it runs in ``batch_s`` at its measured
    speed, at most ``max_batch``.

    The batcher runs one pass at a time, so a request that arrives just after a pass starts waits for it and
    then for its own: with 32 clients on two cores, passes of 32 images at ~90 images/s made that ~700 ms
    while the median was ~430 ms. Passes of ~100 ms cost a CPU runtime next to nothing in throughput (its
    images/s hardly grows past batch 8) and keep every request within a few passes of its arrival. Not
    measured (one candidate, or a recorded choice without speeds): ``max_batch``."""
    speeds = choice.measured.get("images_per_sec") or {}
    speed = speeds.get(choice.runtime.name)
    if batch_s is None or not isinstance(speed, (int, float)) or speed <= 0:
        return max_batch
    return max(1, min(max_batch, int(speed * batch_s)))


@dataclass
class LoadedModel:
    model_id: str
    predictor: Predictor
    batcher: MicroBatcher
    forward: Callable[[Sequence[np.ndarray], bool], torch.Tensor]
    precision: str = "fp32"
    runtime: str = TORCH_CHANNELS_LAST
    choice: Choice | None = None
    preparing: asyncio.Task[None] | None = field(default=None, repr=False)

    on_first_answer: Callable[[LoadedModel], asyncio.Task[None]] | None = field(default=None, repr=False)

    async def probabilities(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        probs = await self.batcher.submit(arrays)
        if self.preparing is None and self.on_first_answer is not None:
            # Only once the model has answered: a refused request (a bad image) leaves nothing in the run folder.
            self.preparing = self.on_first_answer(self)
        return probs

    def use(self, choice: Choice, capacity: int) -> None:
        """Switch to ``choice`` with batches of at most ``capacity`` (the batcher picks both up at its next
        forward pass)."""
        self.forward = batch_forward(choice.runtime, self.predictor.preprocessing.crop_size, capacity)
        self.runtime, self.choice = choice.runtime.name, choice
        self.batcher.max_batch = max(1, capacity)
        self.batcher.lanes = choice.runtime.lanes if choice.runtime.narrow is not None else 1

    async def ready(self) -> None:
        """Wait until the runtime has been chosen (or choosing it failed: PyTorch stays)."""
        if self.preparing is not None:
            await asyncio.shield(self.preparing)

    def info(self) -> dict[str, object]:
        """What this process serves the model with."""
        return {
            "runtime": self.runtime,
            "precision": self.choice.runtime.precision if self.choice else "fp32",
            "requested_precision": self.precision,
            "choosing": self.preparing is not None and not self.preparing.done(),
            "max_batch": self.batcher.max_batch,
            "lanes": self.batcher.lanes,
            "note": self.choice.note if self.choice else "",
        }


class ModelCache:
    def __init__(
        self,
        capacity: int,
        *,
        max_batch: int,
        max_wait_ms: float,
        batch_ms: float | None = None,
        max_pixels: int | None = None,
        loader: Loader = load_predictor,
        on_batch: Callable[[int], None] | None = None,
        on_load: Callable[[], None] | None = None,
        runtime: str = "auto",
        try_compile: bool = False,
        threads: int | None = None,
        lanes: int = 1,
    ) -> None:
        self.capacity = max(1, capacity)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.batch_s = None if batch_ms is None else batch_ms / 1000.0
        self.max_pixels = max_pixels
        self.loader = loader
        self.on_batch = on_batch
        self.on_load = on_load
        self.use_onnx = runtime == "auto"
        self.try_compile = try_compile
        self.threads = threads
        self.lanes = max(1, lanes)
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._discard: set[str] = set()  # evicted while loading: do not keep the result
        self._executor: ThreadPoolExecutor | None = None
        self._prepare_pool: ThreadPoolExecutor | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def loaded(self, model_id: str) -> LoadedModel | None:
        return self._entries.get(model_id)

    async def get(self, model_id: str, run_dir: Path, precision: str = "fp32") -> LoadedModel:
        """The loaded model, loading it (once) if needed; most recently used is kept longest. A model loaded
        for another precision (its owner changed it, maybe through another API process) is loaded again."""
        entry = self._entries.get(model_id)
        if entry is not None and entry.precision != precision:
            await self.evict(model_id)
            entry = None
        if entry is not None:
            self._entries.move_to_end(model_id)
            return entry
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._load(model_id, run_dir, precision), name=f"load-{model_id}"
            )
            task.add_done_callback(_retrieve_exception)
            self._loading[model_id] = task
        # Shielded: a request that goes away must not cancel the load the others wait for.
        return await asyncio.shield(task)

    async def _load(self, model_id: str, run_dir: Path, precision: str) -> LoadedModel:
        try:
            predictor = await asyncio.get_running_loop().run_in_executor(None, self._load_blocking, run_dir)
        finally:
            self._loading.pop(model_id, None)
            discarded = model_id in self._discard
            self._discard.discard(model_id)
        crop = predictor.preprocessing.crop_size
        initial = batch_forward(torch_runtime(predictor, TORCH_CHANNELS_LAST), crop, self.max_batch)
        batcher = MicroBatcher(
            lambda arrays, beside: entry.forward(arrays, beside),  # looked up at each pass: the runtime may change
            max_batch=self.max_batch,
            max_wait_s=self.max_wait_s,
            executor=self._forward_executor(),
            on_batch=self.on_batch,
        )
        entry = LoadedModel(model_id, predictor, batcher, initial, precision)
        if discarded:
            await entry.batcher.close()  # still answers the requests that were waiting, one by one
            return entry
        self._entries[model_id] = entry
        entry.on_first_answer = lambda e: asyncio.get_running_loop().create_task(self._choose_runtime(e, run_dir))
        if self.on_load is not None:
            self.on_load()
        while len(self._entries) > self.capacity:
            _, old = self._entries.popitem(last=False)
            log.info("unloading model %s (cache holds %d)", old.model_id, self.capacity)
            self._close_later(old)
        return entry

    async def _choose_runtime(self, entry: LoadedModel, run_dir: Path) -> None:
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(
                self._prepare_executor(),
                partial(
                    prepare,
                    entry.predictor,
                    run_dir,
                    precision=entry.precision,
                    try_compile=self.try_compile,
                    use_onnx=self.use_onnx,
                    threads=self.threads,
                    lanes=self.lanes,
                ),
            )
            batch = min(MEASURE_BATCH, self.max_batch)
            choice = await loop.run_in_executor(self._forward_executor(), partial(choose, prepared, batch=batch))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the model still answers with PyTorch; say why it stays there
            log.warning("model %s: runtime not chosen, serving with PyTorch: %s", entry.model_id, e)
            return
        entry.use(choice, batch_cap(choice, self.max_batch, self.batch_s))
        log.info(
            "model %s served with %s (%s), batches of at most %d",
            entry.model_id,
            choice.runtime.name,
            choice.runtime.precision,
            entry.batcher.max_batch,
        )

    def _forward_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(  # a thread per lane (see app.serving.batcher)
                max_workers=self.lanes, thread_name_prefix="predict-forward", initializer=lower_thread_priority
            )
        return self._executor

    def _prepare_executor(self) -> ThreadPoolExecutor:
        if self._prepare_pool is None:
            self._prepare_pool = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="predict-prepare",
                initializer=partial(lower_thread_priority, PREPARE_NICE),
            )
        return self._prepare_pool

    def _load_blocking(self, run_dir: Path) -> Predictor:
        predictor = self.loader(run_dir)
        if predictor.device.type == "cpu":
            configure_cpu_threads(self.threads)
        if self.max_pixels is not None:
            predictor.max_pixels = self.max_pixels
        return predictor

    def _close_later(self, entry: LoadedModel) -> None:
        # Requests already queued on the evicted model are still answered; closing waits for them.
        task = asyncio.get_running_loop().create_task(_close(entry))
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
        await _close(entry)  # after this, nothing of ours writes into the model's folder
        return True

    async def close(self) -> None:
        """Unload everything (at shutdown)."""
        entries = list(self._entries.values())
        self._entries.clear()
        for task in list(self._loading.values()):
            task.cancel()
        self._loading.clear()
        for e in entries:
            if e.preparing is not None:
                e.preparing.cancel()
        await asyncio.gather(*(e.batcher.close() for e in entries), *self._closing, return_exceptions=True)
        for pool in (self._executor, self._prepare_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._executor = self._prepare_pool = None


async def _close(entry: LoadedModel) -> None:
    """Answer what is queued, and let a runtime choice in progress finish (it writes into the run folder)."""
    await entry.batcher.close()
    if entry.preparing is not None:
        await asyncio.gather(entry.preparing, return_exceptions=True)


def _retrieve_exception(task: asyncio.Task[LoadedModel]) -> None:
    # Every waiter may have gone away; the error was theirs to see, not the event loop's to log.
    if not task.cancelled():
        task.exception()
