"""The predict path's one-second memory: many requests that miss at once share one lookup."""

from __future__ import annotations

import asyncio

import pytest

from app.services.keycache import TtlCache


class Lookup:
    """A database lookup stand-in that waits until released, counting how often it ran."""

    def __init__(self, value: str = "row", error: Exception | None = None) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.value, self.error = value, error

    async def __call__(self) -> str:
        self.calls += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value


def test_requests_that_miss_together_share_one_lookup() -> None:
    async def scenario() -> None:
        cache: TtlCache[str] = TtlCache(ttl=60)
        lookup = Lookup()
        waiters = [asyncio.ensure_future(cache.get_or_load("k", lookup)) for _ in range(32)]
        await asyncio.sleep(0)
        lookup.release.set()
        assert await asyncio.gather(*waiters) == ["row"] * 32
        assert lookup.calls == 1
        assert cache.get("k") == "row"  # remembered for later requests
        assert await cache.get_or_load("k", Lookup("other")) == "row"

    asyncio.run(scenario())


def test_an_expired_entry_is_looked_up_again() -> None:
    async def scenario() -> None:
        now = [0.0]
        cache: TtlCache[str] = TtlCache(ttl=1.0)
        cache.clock = lambda: now[0]  # type: ignore[method-assign]
        first, second = Lookup("old"), Lookup("new")
        first.release.set()
        second.release.set()
        assert await cache.get_or_load("k", first) == "old"
        now[0] += 0.9
        assert await cache.get_or_load("k", second) == "old"
        now[0] += 0.2
        assert await cache.get_or_load("k", second) == "new"
        assert (first.calls, second.calls) == (1, 1)

    asyncio.run(scenario())


def test_a_failed_lookup_reaches_every_waiter_and_is_not_remembered() -> None:
    async def scenario() -> None:
        cache: TtlCache[str] = TtlCache(ttl=60)
        failing = Lookup(error=LookupError("no such key"))
        waiters = [asyncio.ensure_future(cache.get_or_load("k", failing)) for _ in range(4)]
        await asyncio.sleep(0)
        failing.release.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, LookupError) for r in results)
        assert failing.calls == 1
        assert cache.get("k") is None
        ok = Lookup("row")
        ok.release.set()
        assert await cache.get_or_load("k", ok) == "row"

    asyncio.run(scenario())


def test_a_caller_that_goes_away_leaves_the_lookup_to_the_others() -> None:
    async def scenario() -> None:
        cache: TtlCache[str] = TtlCache(ttl=60)
        lookup = Lookup()
        first = asyncio.ensure_future(cache.get_or_load("k", lookup))
        second = asyncio.ensure_future(cache.get_or_load("k", lookup))
        await asyncio.sleep(0)
        first.cancel()  # the client that started the lookup disconnected
        await asyncio.sleep(0)
        lookup.release.set()
        assert await second == "row"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert lookup.calls == 1

    asyncio.run(scenario())


def test_a_lookup_in_flight_when_the_row_changes_is_not_remembered() -> None:
    async def scenario() -> None:
        cache: TtlCache[str] = TtlCache(ttl=60)
        stale = Lookup("before the change")
        waiter = asyncio.ensure_future(cache.get_or_load("k", stale))
        await asyncio.sleep(0)
        cache.discard("k")  # e.g. the model's serving precision was changed meanwhile
        fresh = Lookup("after the change")
        fresh.release.set()
        assert await cache.get_or_load("k", fresh) == "after the change"
        stale.release.set()
        assert await waiter == "before the change"  # it asked before the change
        assert cache.get("k") == "after the change"

    asyncio.run(scenario())
