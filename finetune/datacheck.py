"""Checking an uploaded dataset folder with flat memory: ``check_folder``.

It gives the verdict, split and report that ``finetune.dataset.load_dataset(folder).report()`` gives (the
same helpers make both), but keeps its per-file records (the file list, each file's hash, size and split,
the original names) in a temporary SQLite file instead of Python objects, so the API process checks a
zip of a million images in the memory it checks a hundred in. The report comes without its ``files``;
``CheckedFolder.files`` streams them, in the report's order. What stays in memory grows only with the
classes and with what the report lists in full (skipped files, duplicate groups), plus two arrays of
integers for the largest class while it is split (16 bytes an image).
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .archive import iter_names, path_key, path_str
from .dataset import (
    SPLITS,
    DatasetOptions,
    ProgressFn,
    Warning_,
    _descend_wrapper_folders,
    _find_layout,
    check_candidate_classes,
    count_warnings,
    ignored_folders,
    name_below,
    verify_files,
    walk_candidates,
)
from .errors import DatasetError
from .tempdb import temp_db

if TYPE_CHECKING:
    from .datastore import StoreFill

_BATCH = 2048
_USABLE = "reason IS NULL"

_SCHEMA = """
CREATE TABLE raw_names (stored BLOB NOT NULL, original BLOB NOT NULL);
CREATE TABLE names (stored BLOB PRIMARY KEY, original BLOB NOT NULL);
CREATE TABLE early (path BLOB NOT NULL, reason BLOB NOT NULL);
CREATE TABLE files (
    id INTEGER PRIMARY KEY,  -- the order files were found in
    path BLOB NOT NULL,
    class INTEGER NOT NULL,  -- an index into CheckedFolder.classes once sorted; first found order before
    folder_split TEXT,       -- the split folder the file is in (train/val/test layouts)
    sha TEXT,
    width INTEGER,
    height INTEGER,
    reason BLOB,             -- why the file cannot be used; NULL: usable
    split TEXT
);
CREATE TABLE groups (class INTEGER, sha TEXT, split TEXT, PRIMARY KEY (class, sha)) WITHOUT ROWID;
"""


@dataclass
class CheckedFolder:
    """A checked folder: its report (without ``files``) and its ledger, until ``close``."""

    root: Path
    classes: list[str]
    report: dict[str, Any]
    _db: sqlite3.Connection

    def files(self) -> Iterator[dict[str, str]]:
        """The report's ``files``, in order: {"path": shown name, "stored" (when it differs), "class", "split"}."""
        rows = self._db.execute(
            "SELECT f.path, n.original, f.class, f.split FROM files f LEFT JOIN names n ON n.stored = f.path "
            f"WHERE f.{_USABLE} ORDER BY f.path"
        )
        for path, original, label, split in rows:
            yield _entry(path, original, **{"class": self.classes[label], "split": split})

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CheckedFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_folder(
    source: str | Path,
    *,
    options: DatasetOptions | None = None,
    store: StoreFill | None = None,
    progress: ProgressFn | None = None,
) -> CheckedFolder:
    """Read, verify, split and report the dataset folder ``source`` as ``load_dataset`` does (without a
    recorded list or ``evaluate_only``: an upload's check). Raises ``DatasetError`` when it cannot be used."""
    options = options or DatasetOptions()
    options.validate()
    if options.files is not None or options.evaluate_only:
        raise ValueError("check_folder checks a dataset as uploaded: no recorded list, no evaluate_only")
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"dataset not found: {source}")
    db = temp_db()
    try:
        db.executescript(_SCHEMA)
        db.execute("BEGIN")
        return _check(db, source, options, store, progress)
    except BaseException:
        db.close()
        raise


def _check(
    db: sqlite3.Connection,
    base: Path,
    options: DatasetOptions,
    store: StoreFill | None,
    progress: ProgressFn | None,
) -> CheckedFolder:
    _insert(db, "INSERT INTO raw_names VALUES (?, ?)", ((path_key(s), path_key(o)) for s, o in iter_names(base)))
    root = _descend_wrapper_folders(base)
    prefix = root.relative_to(base).parts
    below = (name_below(path_str(s), path_str(o), prefix) for s, o in db.execute("SELECT * FROM raw_names"))
    _insert(
        db,
        "INSERT OR REPLACE INTO names VALUES (?, ?)",
        ((path_key(b[0]), path_key(b[1])) for b in below if b is not None),
    )
    db.execute("DELETE FROM raw_names")
    layout = _find_layout(root)
    explicit = layout is not None

    # The candidate files, in the order they are found.
    codes: dict[str, int] = {}  # class name -> its code in the ledger, in the order found
    with_files: set[str] = set()

    def found() -> Iterator[tuple[bytes, int, str | None]]:
        for rel, class_name, split, reason in walk_candidates(root, layout):
            if reason is not None:
                db.execute("INSERT INTO early VALUES (?, ?)", (path_key(rel), path_key(reason)))
                continue
            code = codes.setdefault(class_name, len(codes))
            if rel:
                with_files.add(class_name)
                yield path_key(rel), code, split

    _insert(db, "INSERT INTO files (path, class, folder_split) VALUES (?, ?, ?)", found())
    check_candidate_classes(set(codes), with_files)
    ignored = ignored_folders(root, layout)
    classes = sorted(with_files)
    total = db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    if total > options.max_files:
        raise DatasetError(f"dataset has {total} files, more than the limit of {options.max_files}")
    # Codes become labels (the index in the sorted classes); a folder with no file has no row.
    label_of = {c: i for i, c in enumerate(classes)}
    relabel = [(label_of[name] + len(codes), code) for name, code in codes.items() if name in label_of]
    db.executemany("UPDATE files SET class = ? WHERE class = ?", relabel)
    db.execute("UPDATE files SET class = class - ?", (len(codes),))

    if store is not None:
        store.expect(total)
    outcomes = verify_files(root, _paths(db), total, options, store, progress)
    _update(db, "UPDATE files SET sha = ?, width = ?, height = ?, reason = ? WHERE id = ?", _results(outcomes))
    db.execute("CREATE INDEX files_class_sha ON files (class, sha)")
    db.execute("CREATE INDEX files_path ON files (path)")

    _check_classes(db, classes, explicit)
    if layout is not None:
        db.execute(f"UPDATE files SET split = COALESCE(folder_split, 'train') WHERE {_USABLE}")
        if "val" not in layout:
            # train/ and test/ but no val/: validation images come out of train/, stratified and seeded.
            _stratify(db, classes, "folder_split = 'train'", replace(options, test_fraction=0.0))
    else:
        _stratify(db, classes, "1", options)

    counts = {c: dict.fromkeys(SPLITS, 0) for c in classes}
    num_images = 0
    for label, split, n in db.execute(f"SELECT class, split, COUNT(*) FROM files WHERE {_USABLE} GROUP BY 1, 2"):
        counts[classes[label]][split] += n
        num_images += n
    skipped = [
        _entry(path, original, reason=path_str(reason))
        for path, reason, original in db.execute(
            "SELECT s.path, s.reason, n.original FROM (SELECT path, reason FROM early UNION ALL "
            "SELECT path, reason FROM files WHERE reason IS NOT NULL) s LEFT JOIN names n ON n.stored = s.path "
            "ORDER BY s.path"
        )
    ]
    duplicates, dup_warnings = _duplicates(db)
    warnings = (
        [Warning_("ignored_folder", f"folder {name!r} is not a split and was ignored") for name in ignored]
        + count_warnings(counts)
        + dup_warnings
    )
    if skipped:
        warnings.append(Warning_("skipped_files", f"{len(skipped)} file(s) could not be used"))
    report: dict[str, Any] = {
        "root": str(root),
        "classes": classes,
        "num_images": num_images,
        "split": "explicit" if explicit else "stratified",
        "recorded_split": False,
        "counts": counts,
        "split_totals": {sp: sum(c[sp] for c in counts.values()) for sp in SPLITS},
        "image_size": _size_stats(db, num_images),
        "skipped": skipped,
        "warnings": [asdict(w) for w in warnings],
        "duplicates": duplicates,
        "fingerprint": _fingerprint(db, classes),
    }
    return CheckedFolder(root, classes, report, db)


def _entry(path: bytes, original: bytes | None, **fields: str) -> dict[str, str]:
    """As ``Dataset._entry``: ``path`` is the name to show; ``stored`` (only when it differs) is where it is."""
    stored = path_str(path)
    shown = path_str(original) if original is not None else stored
    return {"path": shown, **({"stored": stored} if shown != stored else {}), **fields}


def _insert(db: sqlite3.Connection, sql: str, rows: Iterator[tuple[Any, ...]]) -> None:
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= _BATCH:
            db.executemany(sql, batch)
            batch.clear()
    if batch:
        db.executemany(sql, batch)


_update = _insert


def _paths(db: sqlite3.Connection) -> Iterator[str]:
    """The files' paths in the order found, read a page at a time (their rows are updated meanwhile)."""
    last = 0
    while rows := db.execute("SELECT id, path FROM files WHERE id > ? ORDER BY id LIMIT ?", (last, _BATCH)).fetchall():
        for _, path in rows:
            yield path_str(path)
        last = rows[-1][0]


def _results(outcomes: Iterator[tuple[str, int, int] | str]) -> Iterator[tuple[Any, ...]]:
    for row_id, outcome in enumerate(outcomes, 1):  # ids are 1, 2, ... in the order found
        if isinstance(outcome, str):
            yield None, None, None, path_key(outcome), row_id
        else:
            yield *outcome, None, row_id


def _check_classes(db: sqlite3.Connection, classes: list[str], explicit: bool) -> None:
    """``finetune.dataset._check_classes`` on the ledger."""
    if len(classes) < 2:
        found = f"found {len(classes)}: {classes}" if classes else "found none"
        raise DatasetError(f"a dataset needs at least 2 classes (one sub-folder per class), {found}")
    stats = {
        label: (n, train, distinct)
        for label, n, train, distinct in db.execute(
            "SELECT class, COUNT(*), SUM(COALESCE(folder_split, 'train') = 'train'), COUNT(DISTINCT sha) "
            f"FROM files WHERE {_USABLE} GROUP BY class"
        )
    }
    for label, name in enumerate(classes):
        n, train, distinct = stats.get(label, (0, 0, 0))
        if n == 0:
            raise DatasetError(f"class {name!r} has no usable image (every file was skipped; see the report)")
        if explicit and train == 0:
            raise DatasetError(f"class {name!r} has no usable image in train/")
        if not explicit and distinct < 2:
            raise DatasetError(
                f"class {name!r} has only 1 distinct usable image; at least 2 are needed "
                "(one to train on, one to validate with)"
            )


def _stratify(db: sqlite3.Connection, classes: list[str], where: str, options: DatasetOptions) -> None:
    """``finetune.dataset._stratified_split`` on the ledger's usable files matching ``where``: per class (in
    name order), its groups of byte-identical files in hash order are shuffled by the same seeded generator,
    and the first go to val, the next to test. Shuffling the groups' positions draws the same order as
    shuffling the groups (a shuffle depends only on the length)."""
    rng = random.Random(options.seed)
    db.execute("DELETE FROM groups")
    usable = f"{_USABLE} AND {where}"
    present = {label for (label,) in db.execute(f"SELECT DISTINCT class FROM files WHERE {usable}")}
    for label in sorted(present, key=lambda i: classes[i]):
        (n,) = db.execute(f"SELECT COUNT(DISTINCT sha) FROM files WHERE class = ? AND {usable}", (label,)).fetchone()
        order = array("q", range(n))
        rng.shuffle(order)
        position = array("q", bytes(8 * n))
        for i, group in enumerate(order):
            position[group] = i
        del order
        n_val = max(1, round(n * options.val_fraction))
        n_test = round(n * options.test_fraction) if options.test_fraction > 0 else 0
        n_test = max(0, min(n_test, n - n_val - 1))
        shas = db.execute(f"SELECT DISTINCT sha FROM files WHERE class = ? AND {usable} ORDER BY sha", (label,))
        k = 0
        while batch := shas.fetchmany(_BATCH):
            rows = []
            for (sha,) in batch:
                at = position[k]
                rows.append((label, sha, "val" if at < n_val else "test" if at < n_val + n_test else "train"))
                k += 1
            db.executemany("INSERT INTO groups VALUES (?, ?, ?)", rows)
    db.execute(
        "UPDATE files SET split = g.split FROM groups g "
        f"WHERE g.class = files.class AND g.sha = files.sha AND files.{_USABLE} AND {where}"
    )


def _duplicates(db: sqlite3.Connection) -> tuple[list[list[str]], list[Warning_]]:
    """``finetune.dataset._duplicates`` on the ledger: groups of byte-identical usable files (shown names,
    in stored path order), groups in the order of their first stored path."""
    rows = db.execute(
        "SELECT f.sha, f.path, n.original, f.class, f.split FROM files f "
        f"JOIN (SELECT sha, MIN(path) AS first FROM files WHERE {_USABLE} GROUP BY sha HAVING COUNT(*) > 1) d "
        "ON d.sha = f.sha LEFT JOIN names n ON n.stored = f.path "
        f"WHERE f.{_USABLE} ORDER BY d.first, f.path"
    )
    groups: list[list[str]] = []
    extra = cross = conflicting = 0
    cross_example = conflicting_example = ""
    current: str | None = None
    labels: set[int] = set()
    splits: set[str] = set()

    def close_group() -> None:
        nonlocal extra, cross, conflicting, cross_example, conflicting_example
        if not groups:
            return
        group = groups[-1]
        extra += len(group) - 1
        if len(splits) > 1:
            cross += 1
            cross_example = cross_example or ", ".join(group[:2])
        if len(labels) > 1:
            conflicting += 1
            conflicting_example = conflicting_example or ", ".join(group[:2])

    for sha, path, original, label, split in rows:
        if sha != current:
            close_group()
            current = sha
            groups.append([])
            labels.clear()
            splits.clear()
        groups[-1].append(path_str(original) if original is not None else path_str(path))
        labels.add(label)
        splits.add(split)
    close_group()
    warnings: list[Warning_] = []
    if groups:
        warnings.append(Warning_("duplicates", f"{extra} byte-identical duplicate file(s) in {len(groups)} group(s)"))
    if cross:
        warnings.append(
            Warning_(
                "duplicates_across_splits",
                f"{cross} image(s) appear both in train and in val/test (e.g. {cross_example}): "
                "validation scores will be optimistic",
            )
        )
    if conflicting:
        warnings.append(
            Warning_(
                "conflicting_labels",
                f"{conflicting} image(s) appear in more than one class (e.g. {conflicting_example})",
            )
        )
    return groups, warnings


def _size_stats(db: sqlite3.Connection, n: int) -> dict[str, Any]:
    """``finetune.dataset._size_stats`` (min, median, max, mean of widths and heights) in SQL."""
    if not n:
        return {}

    def stats(column: str) -> dict[str, Any]:
        low, high, total = db.execute(
            f"SELECT MIN({column}), MAX({column}), SUM({column}) FROM files WHERE {_USABLE}"
        ).fetchone()
        middle = [
            v
            for (v,) in db.execute(
                f"SELECT {column} FROM files WHERE {_USABLE} ORDER BY {column} LIMIT 2 OFFSET ?", ((n - 1) // 2,)
            )
        ]
        median = middle[0] if n % 2 else (middle[0] + middle[1]) / 2
        return {"min": low, "median": median, "max": high, "mean": round(total / n, 1)}

    return {"width": stats("width"), "height": stats("height")}


def _fingerprint(db: sqlite3.Connection, classes: list[str]) -> str:
    """``Dataset.fingerprint``: the classes, then each usable file's path, label, split and hash, by path."""
    h = hashlib.sha256()
    for name in classes:
        h.update(name.encode() + b"\0")
    for path, label, split, sha in db.execute(
        f"SELECT path, class, split, sha FROM files WHERE {_USABLE} ORDER BY path"
    ):
        h.update(f"{path_str(path)}\0{label}\0{split}\0{sha}\n".encode())
    return h.hexdigest()
