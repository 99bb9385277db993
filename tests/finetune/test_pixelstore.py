"""The pixel store on its own: shards, the catalog, staged writes, the byte budget, pins and crash leftovers."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from finetune.pixelstore import PixelStore, parse_bytes, read_shard_index

REPO = Path(__file__).resolve().parents[2]


def pixels(seed: int, h: int = 20, w: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def sha(seed: int) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()


def fill(store: PixelStore, seeds: range, *, pin: object = None, h: int = 20, w: int = 30) -> None:
    with store.writer(pin=pin) as writer:  # type: ignore[arg-type]
        for i in seeds:
            writer.add(sha(i), min(h, w), pixels(i, h, w), (w, h))


def paths(root: Path) -> set[str]:
    return {f"{p.relative_to(root)}:{p.stat().st_size if p.is_file() else '/'}" for p in root.rglob("*")}


def test_round_trip_through_a_few_shards(tmp_path: Path) -> None:
    store = PixelStore(tmp_path, max_bytes=10**9)
    fill(store, range(200))
    usage = store.usage()
    assert usage["entries"] == 200 and usage["shards"] == 1  # 200 images, one file
    for i in (0, 57, 199):
        entry = store.find(sha(i), 20)
        assert entry is not None and (entry.orig_width, entry.orig_height) == (30, 20)
        assert np.array_equal(store.array(entry), pixels(i))
    assert store.find(sha(0), 19) is None and store.find(sha(1000), 20) is None
    # Readers keep one map per shard, whatever the number of images read.
    store.lookup([(sha(i), 20) for i in range(200)])
    arrays = [store.array(e) for e in store.lookup([(sha(i), 20) for i in range(200)]).values()]
    assert len(arrays) == 200 and len(store._maps) == 1
    store.close()


def test_shards_are_cut_by_size_and_describe_themselves(tmp_path: Path) -> None:
    store = PixelStore(tmp_path, max_bytes=10**9)
    with store.writer() as writer:
        writer.target_bytes = 20 * 30 * 3 * 10  # ten images a shard
        for i in range(35):
            writer.add(sha(i), 20, pixels(i), (30, 20))
    shards = sorted((tmp_path / "shards").glob("*.px"))
    assert len(shards) == 4
    index = [row for shard in shards for row in read_shard_index(shard)]
    assert sorted(row[0] for row in index) == sorted(sha(i) for i in range(35))
    # Pixels start on 64-byte boundaries; the whole store is within 1.2x of the raw pixels.
    assert all(row[2] % 64 == 0 for row in index)
    assert sum(p.stat().st_size for p in shards) <= 1.2 * 35 * 20 * 30 * 3
    store.close()


def test_a_staged_write_is_invisible_until_committed_and_leaves_nothing_when_aborted(tmp_path: Path) -> None:
    store = PixelStore(tmp_path, max_bytes=10**9)
    before = paths(tmp_path)
    writer = store.writer(staged=True)
    writer.target_bytes = 1  # every image seals a shard: staged shards wait under building/
    for i in range(5):
        writer.add(sha(i), 20, pixels(i), (30, 20))
    assert store.find(sha(0), 20) is None and store.usage()["building_bytes"] > 0
    writer.abort()
    assert paths(tmp_path) == before  # not a byte left

    writer = store.writer(staged=True)
    for i in range(5):
        writer.add(sha(i), 20, pixels(i), (30, 20))
    assert store.find(sha(4), 20) is None
    writer.commit()
    entry = store.find(sha(4), 20)
    assert entry is not None and np.array_equal(store.array(entry), pixels(4))
    store.close()


def test_the_budget_evicts_least_recently_used_shards_never_pinned_ones(tmp_path: Path) -> None:
    one = 20 * 30 * 3 * 10  # ten images
    store = PixelStore(tmp_path, max_bytes=int(2.5 * one))
    fill(store, range(0, 10))  # shard A
    fill(store, range(10, 20))  # shard B
    with store.pin() as pin:
        found, missing = pin.claim([(sha(i), 20) for i in range(10)])  # A is in use
        assert len(found) == 10 and missing == []
        fill(store, range(20, 30))  # C: over budget; B goes (A is pinned)
        assert store.find(sha(0), 20) is not None
        assert store.find(sha(10), 20) is None and store.find(sha(20), 20) is not None
        fill(store, range(30, 40))  # D: only C can go now
        assert store.find(sha(20), 20) is None and store.find(sha(0), 20) is not None
        entry = store.find(sha(5), 20)
        assert entry is not None and np.array_equal(store.array(entry), pixels(5))  # still readable
    # A was used until its pin was released, after D was written: D is the least recently used now.
    fill(store, range(40, 50))
    assert store.find(sha(30), 20) is None and store.find(sha(0), 20) is not None
    fill(store, range(50, 60))
    assert store.find(sha(0), 20) is None and store.find(sha(40), 20) is not None
    assert store.usage()["used_bytes"] <= store.max_bytes
    assert len(list((tmp_path / "shards").glob("*.px"))) == store.usage()["shards"] == 2
    store.close()


def test_a_pinned_set_larger_than_the_rest_overshoots_rather_than_evicting_it(tmp_path: Path) -> None:
    one = 20 * 30 * 3 * 10
    store = PixelStore(tmp_path, max_bytes=int(1.5 * one))  # room for one shard of ten images
    with store.pin() as pin:
        fill(store, range(0, 10), pin=pin)
        fill(store, range(10, 20), pin=pin)  # pinned from birth: both stay, over the budget
        assert store.usage()["used_bytes"] > store.max_bytes
        assert store.find(sha(0), 20) is not None and store.find(sha(10), 20) is not None
        assert store.usage()["pinned_bytes"] == store.usage()["used_bytes"]
    fill(store, range(20, 30))
    assert store.usage()["used_bytes"] <= store.max_bytes
    store.close()


PIN_AND_WAIT = textwrap.dedent(
    """
    import sys, time
    from finetune.pixelstore import PixelStore
    store = PixelStore(sys.argv[1], max_bytes=10**9)
    pin = store.pin()
    keys = [(k, 20) for k in sys.argv[2:]]
    found, _ = pin.claim(keys)
    print(len(found), flush=True)
    writer = store.writer()  # a writer that never finishes: its folder is left behind
    writer.target_bytes = 10**9
    import numpy as np
    writer.add("f" * 64, 1, np.zeros((1, 1, 3), np.uint8), (1, 1))
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_reader_pins_nothing_and_a_killed_writer_leaves_nothing(tmp_path: Path) -> None:
    one = 20 * 30 * 3 * 10
    store = PixelStore(tmp_path, max_bytes=int(1.5 * one))
    fill(store, range(10))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PIN_AND_WAIT, str(tmp_path), *[sha(i) for i in range(10)]],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "10" and proc.stdout.readline().strip() == "ready"
    fill(store, range(10, 20))  # the other process pins the first shard: it stays
    assert store.find(sha(0), 20) is not None and store.usage()["pinned_bytes"] > 0
    assert len(list((tmp_path / "building").iterdir())) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    # The kernel dropped its locks: its pin protects nothing, its half-written shard is swept on next open.
    assert store.usage()["pinned_bytes"] == 0
    fill(store, range(20, 30))
    assert store.find(sha(0), 20) is None
    store.close()
    PixelStore(tmp_path, max_bytes=10**9).close()
    assert list((tmp_path / "building").iterdir()) == []
    assert list((tmp_path / "pins").iterdir()) == []


def test_a_damaged_shard_is_dropped_when_the_catalog_is_rebuilt(tmp_path: Path) -> None:
    store = PixelStore(tmp_path, max_bytes=10**9)
    fill(store, range(3))
    fill(store, range(3, 6))
    store.close()
    shards = sorted((tmp_path / "shards").glob("*.px"))
    damaged = shards[0]
    data = bytearray(damaged.read_bytes())
    data[-30] ^= 0xFF  # inside the index: the checksum no longer matches
    damaged.write_bytes(bytes(data))
    for f in tmp_path.glob("catalog.sqlite*"):
        f.unlink()
    store = PixelStore(tmp_path, max_bytes=10**9)
    assert store.usage()["entries"] == 3 and not damaged.exists()
    store.close()


def test_an_orphan_shard_without_catalog_rows_is_removed(tmp_path: Path) -> None:
    store = PixelStore(tmp_path, max_bytes=10**9)
    fill(store, range(3))
    (tmp_path / "shards" / "0123.px").write_bytes(b"left by a crash between rename and insert")
    store.close()
    PixelStore(tmp_path, max_bytes=10**9).close()
    assert not (tmp_path / "shards" / "0123.px").exists()


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5000000", 5_000_000),
        ("500M", 500 * 1024**2),
        ("20G", 20 * 1024**3),
        ("1.5TiB", int(1.5 * 1024**4)),
        ("2kb", 2048),
    ],
)
def test_byte_counts(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "-5G", "G"])
def test_bad_byte_counts_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="byte count"):
        parse_bytes(text)


def test_the_budget_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_MAX_BYTES", "3M")
    store = PixelStore(tmp_path)
    assert store.max_bytes == 3 * 1024**2
    store.close()
    monkeypatch.delenv("FINETUNE_CACHE_MAX_BYTES")
    store = PixelStore(tmp_path)
    assert 0 < store.max_bytes < os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
    store.close()
