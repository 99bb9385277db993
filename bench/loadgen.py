"""A closed-loop HTTP load generator: ``concurrency`` clients posting one image each, back to back.

An image goes as a multipart file part (``field``) or, with ``field=None``, as the raw request body
(``Content-Type: image/jpeg``). With several images, the clients take them in turn (client i starts at
image i), so a server sees a pool of distinct files, as it would from real users.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx


async def _run(
    url: str,
    field: str | None,
    images: Sequence[bytes],
    concurrency: int,
    duration: float,
    warmup: float,
    headers: dict[str, str],
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration

        async def one_client(index: int) -> None:
            nonlocal errors
            n = index
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return  # (a request still in flight at the end is waited for, and not counted)
                image = images[n % len(images)]
                n += 1
                try:
                    if field is None:
                        r = await client.post(url, content=image, headers={"Content-Type": "image/jpeg"})
                    else:
                        r = await client.post(url, files={field: ("image.jpg", image, "image/jpeg")})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                # Every answer that arrives inside the window counts, whenever it was sent: a server whose
                # answers take longer than the window is measured by what it completes, not read as zero.
                if measure_from <= t1 <= stop_at:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / duration,
        "p50_ms": pct(0.50) * 1000,
        "p99_ms": pct(0.99) * 1000,
    }


def run_load(
    url: str,
    field: str | None,
    image: bytes | Sequence[bytes],
    *,
    concurrency: int,
    duration: float,
    warmup: float = 2.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    images = [image] if isinstance(image, bytes) else list(image)
    return asyncio.run(_run(url, field, images, concurrency, duration, warmup, headers or {}))
