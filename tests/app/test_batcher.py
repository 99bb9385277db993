"""The micro-batcher: concurrent requests share forward passes of at most ``max_batch`` images, first come
first served, and a model's cap follows its measured speed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from app.serving.batcher import MicroBatcher
from app.serving.cache import batch_cap
from finetune.serving import Choice, Runtime


def test_passes_hold_at_most_max_batch_images_in_arrival_order() -> None:
    sizes: list[int] = []

    def forward(arrays: Sequence[np.ndarray], beside: bool) -> torch.Tensor:
        sizes.append(len(arrays))
        return torch.tensor([[float(a[0])] for a in arrays])

    async def main() -> list[float]:
        batcher = MicroBatcher(forward, max_batch=3, max_wait_s=0.05)
        answers = await asyncio.gather(*(batcher.submit([np.array([i])]) for i in range(10)))
        batcher.max_batch = 5  # a new cap (a runtime was chosen) holds from the next pass
        more = await asyncio.gather(*(batcher.submit([np.array([i])]) for i in range(10, 20)))
        await batcher.close()
        return [float(a[0, 0]) for a in [*answers, *more]]

    assert asyncio.run(main()) == [float(i) for i in range(20)]
    assert sizes[:4] == [3, 3, 3, 1] and sizes[4:] == [5, 5]


def _choice(speeds: dict[str, float], name: str = "onnxruntime") -> Choice:
    runtime = Runtime(name, "fp32", lambda batch: batch)
    return Choice(runtime, {"winner": name, "images_per_sec": speeds})


def test_the_cap_is_what_the_runtime_runs_in_the_batch_time() -> None:
    assert batch_cap(_choice({"onnxruntime": 93.0, "torch-eager": 61.0}), 32, 0.1) == 9
    assert batch_cap(_choice({"onnxruntime": 4000.0}), 32, 0.1) == 32  # a GPU: the configured maximum
    assert batch_cap(_choice({"onnxruntime": 3.0}), 32, 0.1) == 1  # a slow model still answers
    assert batch_cap(_choice({}), 32, 0.1) == 32  # one candidate, not measured
    assert batch_cap(_choice({"onnxruntime": 93.0}), 32, None) == 32  # no batch time set


def _recording_batcher(sizes: list[int], max_wait_s: float) -> MicroBatcher:
    def forward(arrays: Sequence[np.ndarray], beside: bool) -> torch.Tensor:
        sizes.append(len(arrays))
        return torch.zeros(len(arrays), 1)

    return MicroBatcher(forward, max_batch=8, max_wait_s=max_wait_s)


def test_a_lone_request_does_not_wait_for_company() -> None:
    sizes: list[int] = []

    async def main() -> None:
        batcher = _recording_batcher(sizes, max_wait_s=60.0)
        # Nothing else is on its way, so the batch runs at once instead of waiting out the minute.
        await asyncio.wait_for(batcher.submit([np.zeros(1)]), timeout=10)
        await batcher.close()

    asyncio.run(main())
    assert sizes == [1]


def test_a_batch_waits_for_a_request_still_preparing_its_images() -> None:
    sizes: list[int] = []

    async def main() -> None:
        batcher = _recording_batcher(sizes, max_wait_s=60.0)

        async def slow_request() -> torch.Tensor:
            with batcher.arriving():
                await asyncio.sleep(0.2)  # decoding
            return await batcher.submit([np.zeros(1)])

        slow = asyncio.create_task(slow_request())
        await asyncio.sleep(0)  # the slow request is now preparing
        await asyncio.wait_for(asyncio.gather(batcher.submit([np.zeros(1)]), slow), timeout=10)
        await batcher.close()

    asyncio.run(main())
    assert sizes == [2]  # one pass for both: the first waited for the second


class _Lanes:
    """A forward that records each pass (images, beside) and how many ran at once."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, bool]] = []
        self.in_flight = self.most_at_once = 0
        self.lock = threading.Lock()

    def __call__(self, arrays: Sequence[np.ndarray], beside: bool) -> torch.Tensor:
        with self.lock:
            self.passes.append((len(arrays), beside))
            self.in_flight += 1
            self.most_at_once = max(self.most_at_once, self.in_flight)
        time.sleep(0.02)  # long enough for the next batch to form while this one runs
        with self.lock:
            self.in_flight -= 1
        return torch.tensor([[float(a[0])] for a in arrays])


def _burst_and_lone_requests(forward: _Lanes, lanes: int) -> list[float]:
    async def main() -> list[float]:
        batcher = MicroBatcher(forward, max_batch=8, max_wait_s=0.004, executor=ThreadPoolExecutor(2), lanes=lanes)
        lone = [await batcher.submit([np.array([i])]) for i in range(3)]  # one client, one request at a time
        burst = await asyncio.gather(*(batcher.submit([np.array([i])]) for i in range(3, 40)))
        await batcher.close()
        return [float(a[0, 0]) for a in [*lone, *burst]]

    return asyncio.run(main())


def test_under_load_passes_run_side_by_side_on_narrow_lanes_and_a_lone_request_runs_wide() -> None:
    forward = _Lanes()
    assert _burst_and_lone_requests(forward, lanes=2) == [float(i) for i in range(40)]  # each its own answer
    assert forward.passes[:3] == [(1, False)] * 3  # nothing beside them: every thread for each
    under_load = forward.passes[3:]
    assert forward.most_at_once == 2
    assert any(beside for _, beside in under_load)
    assert all(n <= 4 for n, beside in under_load if beside)  # a lane takes its share of max_batch
    assert sum(n for n, _ in under_load) == 37


def test_one_lane_runs_one_pass_at_a_time_on_every_thread() -> None:
    forward = _Lanes()
    assert _burst_and_lone_requests(forward, lanes=1) == [float(i) for i in range(40)]
    assert forward.most_at_once == 1
    assert not any(beside for _, beside in forward.passes)
    assert max(n for n, _ in forward.passes) == 8


def test_closing_answers_every_request_queued_or_in_a_pass_on_either_lane() -> None:
    forward = _Lanes()

    async def main() -> list[float]:
        batcher = MicroBatcher(forward, max_batch=8, max_wait_s=0.004, executor=ThreadPoolExecutor(2), lanes=2)
        requests = [asyncio.create_task(batcher.submit([np.array([i])])) for i in range(30)]
        await asyncio.sleep(0.01)  # passes are running on both lanes, the rest queued
        await batcher.close()
        assert all(r.done() for r in requests)  # the close returned only once all were answered
        return [float((await r)[0, 0]) for r in requests]

    assert asyncio.run(main()) == [float(i) for i in range(30)]
    assert forward.most_at_once == 2


def test_a_cancelled_batcher_still_answers_the_requests_of_its_passes_in_flight() -> None:
    # E.g. the event loop shutting down: what a running pass computes still reaches its requests, with one
    # lane as with two; only requests still queued are left for the caller to cancel.
    for lanes in (1, 2):
        forward = _Lanes()

        async def main(lanes: int = lanes, forward: _Lanes = forward) -> list[float]:
            batcher = MicroBatcher(forward, max_batch=4, max_wait_s=0.0, executor=ThreadPoolExecutor(2), lanes=lanes)
            first = asyncio.create_task(batcher.submit([np.array([7])]))
            while forward.in_flight == 0:  # its pass has started
                await asyncio.sleep(0.001)
            assert batcher._task is not None
            batcher._task.cancel()
            answer = await first
            return [float(answer[0, 0])]

        assert asyncio.run(main()) == [7.0]
