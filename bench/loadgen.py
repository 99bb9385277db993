"""A closed-loop HTTP load generator: ``concurrency`` clients posting one image each, back to back.

An image goes as a multipart file part (``field``) or, with ``field=None``, as the raw request body
(``Content-Type: image/jpeg``). With several images, the clients take them in turn (client i starts at
image i), so a server sees a pool of distinct files, as it would from real users.

It shares the machine with the server it measures, so it is lean the way wrk and hey are: each request is
built once, as bytes, before the clock starts, and a client speaks HTTP/1.1 over its own keep-alive
connection with asyncio streams (a general-purpose client such as httpx spends about a millisecond of CPU
on each request, which on two cores is taken from the server). It reads what a server may send back: a
``Content-Length`` body or a chunked one, and a ``Connection: close`` (it reconnects). The CPU it used is
reported beside the figures (``client_cpu_ms_per_request``).
"""

from __future__ import annotations

import asyncio
import resource
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit


def build_requests(url: str, field: str | None, images: Sequence[bytes], headers: dict[str, str]) -> list[bytes]:
    """One complete HTTP/1.1 request per image: the raw image as the body, or a multipart form with the
    image as the file part ``field``."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    out = []
    for image in images:
        if field is None:
            content_type, body = "image/jpeg", image
        else:
            boundary = uuid.uuid4().hex
            content_type = f"multipart/form-data; boundary={boundary}"
            body = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="image.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n".encode()
                + image
                + f"\r\n--{boundary}--\r\n".encode()
            )
        head = {
            "Host": parts.netloc,
            "User-Agent": "finetune-bench-loadgen",
            "Accept": "*/*",
            **headers,
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
        }
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        out.append(f"POST {target} HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body)
    return out


class Connection:
    """One keep-alive connection: send a prepared request, read the whole answer, reconnect when the server
    closes."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes) -> int:
        """The answer's status code; raises OSError or asyncio.IncompleteReadError on a broken exchange."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        assert self.reader is not None
        try:
            self.writer.write(data)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            fields = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    fields[name.strip().lower()] = value.strip().lower()
            if "chunked" in fields.get("transfer-encoding", ""):
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await self.reader.readexactly(size + 2)  # the chunk and its CRLF
                    if size == 0:
                        break
            else:
                await self.reader.readexactly(int(fields.get("content-length", "0")))
            if fields.get("connection") == "close":
                await self.close()
            return status
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def _run(
    url: str,
    field: str | None,
    images: Sequence[bytes],
    concurrency: int,
    duration: float,
    warmup: float,
    headers: dict[str, str],
) -> dict[str, Any]:
    requests = build_requests(url, field, images, headers)
    parts = urlsplit(url)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    exchanges = 0  # every request answered or failed, warm-up included: what the CPU figure is divided by
    cpu_before = _cpu_seconds()

    async def one_client(index: int) -> None:
        nonlocal errors, exchanges
        conn = Connection(parts.hostname or "127.0.0.1", parts.port or 80)
        n = index
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return  # (a request still in flight at the end is waited for, and not counted)
                data = requests[n % len(requests)]
                n += 1
                try:
                    ok = await asyncio.wait_for(conn.request(data), 60.0) == 200
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError):
                    ok = False
                t1 = time.perf_counter()
                exchanges += 1
                # Every answer that arrives inside the window counts, whenever it was sent: a server whose
                # answers take longer than the window is measured by what it completes, not read as zero.
                if measure_from <= t1 <= stop_at:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1
        finally:
            await conn.close()

    await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    cpu = _cpu_seconds() - cpu_before  # connecting and closing included: an upper bound
    return _summary(concurrency, latencies, errors, duration, 1000 * cpu, exchanges)


def _summary(
    concurrency: int, latencies: list[float], errors: int, duration: float, cpu_ms: float, exchanges: int
) -> dict[str, Any]:
    latencies = sorted(latencies)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / duration,
        "p50_ms": pct(0.50) * 1000,
        "p99_ms": pct(0.99) * 1000,
        "client_cpu_ms_per_request": round(cpu_ms / max(1, exchanges), 3),
        # kept for merging rounds (``run_rounds``), dropped from what it returns
        "_raw": {"latencies": latencies, "cpu_ms": cpu_ms, "exchanges": exchanges, "duration": duration},
    }


def merged(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One figure from several windows of the same load: requests over their summed time, percentiles over
    all their latencies."""
    raws = [p["_raw"] for p in parts]
    out = _summary(
        parts[0]["concurrency"],
        [x for r in raws for x in r["latencies"]],
        sum(p["errors"] for p in parts),
        sum(r["duration"] for r in raws),
        sum(r["cpu_ms"] for r in raws),
        sum(r["exchanges"] for r in raws),
    )
    out.pop("_raw")
    out["rounds"] = len(parts)
    return out


def run_rounds(
    arms: dict[str, Callable[[float, float], dict[str, Any]]],
    *,
    duration: float,
    rounds: int,
    warmup: float,
) -> dict[str, dict[str, Any]]:
    """Each arm's figure from ``rounds`` windows of ``duration / rounds`` seconds, the arms taking turns
    within every round (and leading in turn): on a host whose speed wanders from one minute to the next,
    every arm sees the same stretches of it, where one long window each would compare different ones.
    ``arms`` maps a name to ``load(duration, warmup)``, which runs one window (``run_load``)."""
    names = list(arms)
    parts: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(max(1, rounds)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            parts[name].append(arms[name](duration / max(1, rounds), warmup))
    return {name: merged(parts[name]) for name in names}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_load(
    url: str,
    field: str | None,
    image: bytes | Sequence[bytes],
    *,
    concurrency: int,
    duration: float,
    warmup: float = 2.0,
    headers: dict[str, str] | None = None,
    keep_raw: bool = False,
) -> dict[str, Any]:
    images = [image] if isinstance(image, bytes) else list(image)
    result = asyncio.run(_run(url, field, images, concurrency, duration, warmup, headers or {}))
    return result if keep_raw else {k: v for k, v in result.items() if k != "_raw"}
