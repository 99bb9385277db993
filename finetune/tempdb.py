"""A private SQLite database in a temporary file, for per-item records that must not grow a process's memory.

A check of a million images keeps a few hundred bytes of records per image; as Python objects that is
gigabytes, in a temporary SQLite file it is a bounded page cache (about 2 MB) and a file that disappears
when the connection closes.
"""

from __future__ import annotations

import sqlite3


def temp_db() -> sqlite3.Connection:
    """A new private on-disk temporary database (deleted when closed), autocommit, no journal: it is
    scratch space, never read after a crash. Usable from any thread, one at a time."""
    db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    return db
