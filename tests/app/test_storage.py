"""tmp/ belongs to the process that made each entry: a process cleans its own entries and stale ones (a
crash's leftovers), never another live process's upload in flight, even from another host."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from app.storage import PROCESS_TOKEN, Storage

REPO = Path(__file__).resolve().parents[2]


def other_process_temp_dir(root: Path) -> Path:
    """A tmp/ entry made by another process (another API, maybe on another host)."""
    code = "import sys; from pathlib import Path; from app.storage import Storage; print(Storage(Path(sys.argv[1])).new_temp_dir('upload'))"
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, cwd=REPO, check=True)
    return Path(out.stdout.strip())


def test_a_process_cleans_its_own_and_stale_entries_only(tmp_path: Path) -> None:
    storage = Storage(tmp_path, stale_seconds=600)
    mine = storage.new_temp_dir("upload")
    assert PROCESS_TOKEN in mine.name
    live = other_process_temp_dir(tmp_path)
    (live / "incoming").mkdir()
    crashed = other_process_temp_dir(tmp_path)
    old = time.time() - 3600
    os.utime(crashed, (old, old))
    legacy = tmp_path / "tmp" / "upload-0123456789abcdef"  # the old layout, without an owner
    legacy.mkdir()
    os.utime(legacy, (old, old))

    removed = storage.clean_temp()
    assert sorted(removed) == sorted([mine.name, crashed.name, legacy.name])
    assert live.is_dir() and (live / "incoming").is_dir()


def test_an_owner_keeps_its_long_running_entries_fresh(tmp_path: Path) -> None:
    storage = Storage(tmp_path, stale_seconds=600)
    mine = storage.new_temp_dir("upload")
    old = time.time() - 3600
    os.utime(mine, (old, old))
    stop = threading.Event()
    storage.keep_temp_alive(stop, interval=0.05)
    try:
        deadline = time.monotonic() + 10
        while mine.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
    assert mine.stat().st_mtime > time.time() - 60
    code = "import sys; from pathlib import Path; from app.storage import Storage; print(Storage(Path(sys.argv[1]), stale_seconds=600).clean_temp())"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "[]" and mine.is_dir()  # another process starting now leaves it alone
