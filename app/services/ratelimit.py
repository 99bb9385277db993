"""Per-user rate limits: token buckets kept in this process's memory.

Each (user, action) has a bucket of ``burst`` tokens refilled at ``per_minute`` a minute; a request takes
one token or is refused (``LimitReached``: 429 with Retry-After). Several API processes each keep their own
buckets, so the limit is per process: a bound on abuse, not an accounting system.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from app.domain_errors import LimitReached
from app.settings import Settings


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: float, burst: int | None = None) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, int(per_minute)))
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str, what: str) -> None:
        """Take one token for ``key`` or raise ``LimitReached`` saying when to retry."""
        if self.rate <= 0:
            return  # 0 disables the limit
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return
            wait = math.ceil((1 - bucket.tokens) / self.rate)
        raise LimitReached(f"too many {what} requests; retry in {wait} s", retry_after=wait)


@dataclass
class RateLimits:
    """The app's limiters (``app.state.rate_limits``), keyed by user id."""

    predict: RateLimiter
    uploads: RateLimiter

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        per_hour = settings.rate_limit_uploads_per_hour
        return cls(
            predict=RateLimiter(settings.rate_limit_predict_per_minute),
            # An hourly allowance may be spent at once, then comes back at per_hour / 60 a minute.
            uploads=RateLimiter(per_hour / 60.0, burst=max(1, int(per_hour))),
        )
