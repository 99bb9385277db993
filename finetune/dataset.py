"""Datasets: an image folder (one sub-folder per class) or a zip of one, verified, split and reported.

``load_dataset`` is the single entry point. It decodes every file once (into the pixel store when one is
given, so training never decodes it again), skips and reports what cannot be used, splits the rest
(stratified and seeded, or the ``train/``/``val/``/``test/`` split the folder already has) and returns a
``Dataset`` whose ``report()`` is JSON-serialisable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .archive import ArchiveLimits, check_distinct_folders, extract_zip, is_junk, read_names, shown_folder
from .errors import DatasetError, FolderNameClashError, ImageError
from .images import DEFAULT_MAX_PIXELS, decode_for_size
from .preprocess import stored_pixels

if TYPE_CHECKING:
    from .datastore import StoreFill

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
# A small decode is enough to prove a file is a whole, readable image when no cache is being filled.
_VERIFY_SIZE = 32
IMBALANCE_RATIO = 10.0
SMALL_CLASS = 10

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class DatasetOptions:
    """How a dataset is read and split. Every field has a working default."""

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = 64 * 1024**2
    max_files: int = 1_000_000
    workers: int | None = None
    # Evaluation of a trained model: every usable image goes to "test", no split rules apply.
    evaluate_only: bool = False
    archive_limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    # A recorded list of the images to use, {path under the dataset root: its split, or None}: nothing else
    # is read. With every split given, that is the split; otherwise the listed images are split here.
    files: Mapping[str, str | None] | None = None

    def validate(self) -> None:
        problems = []
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if not 0 <= self.test_fraction < 1:
            problems.append(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.val_fraction + self.test_fraction >= 0.9:
            problems.append("val_fraction + test_fraction must leave at least 10% of images for training")
        if self.files is not None and not set(self.files.values()) <= {*SPLITS, None}:
            problems.append(f"a recorded split must be one of {', '.join(SPLITS)}")
        if problems:
            from .errors import ConfigError

            raise ConfigError(problems)


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root, POSIX separators
    label: int
    split: str
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class Warning_:
    code: str
    message: str


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[Skipped]
    explicit_split: bool
    warnings: list[Warning_]
    duplicates: list[list[str]]
    # {stored path: original path}, both relative to ``root``, for files stored under generated names
    # (``finetune.archive.StoredNames``); the report shows the originals. Empty: names are as stored.
    names: dict[str, str] = field(default_factory=dict)
    recorded_split: bool = False  # the split came from a recorded list (``DatasetOptions.files``)

    def display(self, path: str) -> str:
        """The name to show for a stored relative path: the user's original name when it was renamed."""
        return self.names.get(path, path)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        """Identifies the exact images, labels and split: a resumed run checks it is unchanged."""
        h = hashlib.sha256()
        for name in self.classes:
            h.update(name.encode() + b"\0")
        for s in sorted(self.samples, key=lambda s: s.path):
            h.update(f"{s.path}\0{s.label}\0{s.split}\0{s.sha256}\n".encode())
        return h.hexdigest()

    def counts(self) -> dict[str, dict[str, int]]:
        """{class name: {split: count}} including zeros, so tables line up."""
        table = {c: dict.fromkeys(SPLITS, 0) for c in self.classes}
        for s in self.samples:
            table[self.classes[s.label]][s.split] += 1
        return table

    def report(self, *, include_files: bool = True) -> dict:
        counts = self.counts()
        widths = [s.width for s in self.samples]
        heights = [s.height for s in self.samples]
        report: dict = {
            "root": str(self.root),
            "classes": self.classes,
            "num_images": len(self.samples),
            "split": "explicit" if self.explicit_split else "stratified",
            "recorded_split": self.recorded_split,
            "counts": counts,
            "split_totals": {sp: sum(c[sp] for c in counts.values()) for sp in SPLITS},
            "image_size": _size_stats(widths, heights),
            "skipped": [self._entry(s.path, reason=s.reason) for s in self.skipped],
            "warnings": [asdict(w) for w in self.warnings],
            "duplicates": [[self.display(p) for p in group] for group in self.duplicates],
            "fingerprint": self.fingerprint,
        }
        if include_files:
            report["files"] = [
                self._entry(s.path, **{"class": self.classes[s.label], "split": s.split}) for s in self.samples
            ]
        return report

    def _entry(self, path: str, **fields: str) -> dict[str, str]:
        """``path`` is the name to show; ``stored`` (only when it differs) is where the file is."""
        shown = self.display(path)
        return {"path": shown, **({"stored": path} if shown != path else {}), **fields}


def load_dataset(
    source: str | Path,
    *,
    options: DatasetOptions | None = None,
    store: StoreFill | None = None,
    extract_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> Dataset:
    """Read, verify, split and report a dataset folder or ``.zip``.

    With ``store``, the verification decode fills the pixel store (and files already in it are not
    decoded again). A zip is extracted safely into ``extract_dir`` (required for zips) first.
    Raises ``DatasetError`` when the dataset cannot be used at all.
    """
    options = options or DatasetOptions()
    options.validate()
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"dataset not found: {source}")
    if source.is_file():
        if extract_dir is None:
            raise DatasetError("a zip dataset needs a folder to extract into (extract_dir)")
        root = _extract_once(source, Path(extract_dir), options.archive_limits)
    else:
        root = source
    base, names = root, read_names(root)
    root = _descend_wrapper_folders(root)
    layout = _find_layout(root)
    candidates, skipped, ignored = _collect_files(root, layout, options)
    recorded = options.files is not None and None not in options.files.values()
    if options.files is not None:
        candidates, skipped = _recorded_only(candidates, options.files), []  # the rest was reported then
    classes = sorted({c for _, c, _ in candidates})
    if len(candidates) > options.max_files:
        raise DatasetError(f"dataset has {len(candidates)} files, more than the limit of {options.max_files}")
    if store is not None:
        store.expect(len(candidates))
    checked = _verify_all(root, candidates, options, store, progress)
    samples_raw: list[tuple[str, str, str | None, str, int, int]] = []
    for (rel, cls, split), outcome in zip(candidates, checked, strict=True):
        if isinstance(outcome, str):
            skipped.append(Skipped(rel, outcome))
        else:
            sha, w, h = outcome
            samples_raw.append((rel, cls, split, sha, w, h))
    explicit = layout is not None
    label_of = {c: i for i, c in enumerate(classes)}
    if options.evaluate_only:
        if not samples_raw:
            raise DatasetError(f"no usable image in {source}")
        samples = [Sample(r, label_of[c], "test", sha, w, h) for r, c, _, sha, w, h in samples_raw]
        explicit = True
    elif recorded:
        assert options.files is not None
        samples = [Sample(r, label_of[c], str(options.files[r]), sha, w, h) for r, c, _, sha, w, h in samples_raw]
        _check_classes(classes, [(r, c, options.files[r]) for r, c, *_ in samples_raw], True)
    elif explicit:
        _check_classes(classes, samples_raw, explicit)
        samples = [Sample(r, label_of[c], sp or "train", sha, w, h) for r, c, sp, sha, w, h in samples_raw]
        if layout is not None and "val" not in layout:
            # train/ and test/ but no val/: validation images come out of train/, stratified and seeded.
            train_raw = [item for item in samples_raw if item[2] == "train"]
            samples = [s for s in samples if s.split != "train"]
            samples += _stratified_split(train_raw, label_of, replace(options, test_fraction=0.0))
    else:
        _check_classes(classes, samples_raw, explicit)
        samples = _stratified_split(samples_raw, label_of, options)
    samples.sort(key=lambda s: s.path)
    skipped.sort(key=lambda s: s.path)
    dataset = Dataset(root, classes, samples, skipped, explicit, [], [], _names_below(names, base, root), recorded)
    dataset.duplicates, dup_warnings = _duplicates(dataset)
    dataset.warnings = (
        [Warning_("ignored_folder", f"folder {name!r} is not a split and was ignored") for name in ignored]
        + _class_warnings(dataset)
        + dup_warnings
    )
    if skipped:
        dataset.warnings.append(Warning_("skipped_files", f"{len(skipped)} file(s) could not be used"))
    return dataset


def _recorded_only(
    candidates: list[tuple[str, str, str | None]], files: Mapping[str, str | None]
) -> list[tuple[str, str, str | None]]:
    """The candidates a recorded list names; every listed file must still be there."""
    kept = [c for c in candidates if c[0] in files]
    if len(kept) != len(files):
        present = {c[0] for c in kept}
        missing = sorted(f for f in files if f not in present)
        raise DatasetError(
            f"{len(missing)} recorded file(s) are not in the dataset folder any more (e.g. {missing[0]!r})"
        )
    return kept


def read_split_file(path: str | Path) -> dict[str, str | None]:
    """A recorded list of images (JSON Lines, one ``{"stored" or "path": ..., "split": ...}`` a line) as
    ``DatasetOptions.files``."""
    import json

    files: dict[str, str | None] = {}
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    files[str(entry.get("stored") or entry["path"])] = entry.get("split")
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise DatasetError(f"{path}, line {n}: not a recorded split entry ({e})") from None
    except FileNotFoundError:
        raise DatasetError(f"split file not found: {path}") from None
    return files


def _names_below(names: dict[str, str], base: Path, root: Path) -> dict[str, str]:
    """``names`` (relative to ``base``) for the files under ``root``, relative to ``root``."""
    prefix = root.relative_to(base).parts
    out: dict[str, str] = {}
    for stored, original in names.items():
        below = name_below(stored, original, prefix)
        if below is not None:
            out[below[0]] = below[1]
    return out


def name_below(stored: str, original: str, prefix: tuple[str, ...]) -> tuple[str, str] | None:
    """A (stored, original) name relative to the folder ``prefix`` (parts, relative to the names file's
    folder) below it, or None when the file is not under it. Stored paths have as many parts as their
    originals (folders are renamed one for one), so the original loses as many leading folders as the
    stored path."""
    depth = len(prefix)
    sp, op = PurePosixPath(stored).parts, PurePosixPath(original).parts
    if sp[:depth] == prefix and len(sp) > depth and len(op) > depth:
        return str(PurePosixPath(*sp[depth:])), str(PurePosixPath(*op[depth:]))
    return None


def _extract_once(archive: Path, extract_dir: Path, limits: ArchiveLimits) -> Path:
    """Extract into ``extract_dir/<content hash>`` unless that exists (a finished extraction)."""
    digest = _sha256_file(archive)[:24]
    target = extract_dir / digest
    if not target.is_dir():
        extract_dir.mkdir(parents=True, exist_ok=True)
        try:
            extract_zip(archive, target, limits)
        except FileExistsError:  # another process finished the same extraction first
            pass
    return target


def _descend_wrapper_folders(root: Path) -> Path:
    """A zip of ``flowers/`` holds ``flowers/daisy/...``: use the single wrapper folder as the root. A lone
    ``train/`` folder of class folders is descended into as well: a training set with nothing held out,
    which gets the stratified split like any folder of classes (not one class named 'train')."""
    for _ in range(8):
        entries = [e for e in _listdir(root) if not is_junk(PurePosixPath(e.name))]
        dirs = [e for e in entries if e.is_dir()]
        if len(dirs) == 1 and len(entries) == 1 and _SPLIT_ALIASES.get(dirs[0].name.lower()) in (None, "train"):
            inner = [e for e in _listdir(Path(dirs[0].path)) if not is_junk(PurePosixPath(e.name))]
            if any(e.is_dir() for e in inner):
                root = Path(dirs[0].path)
                continue
        break
    return root


def _find_layout(root: Path) -> dict[str, Path] | None:
    """{'train': path, 'val': path, 'test': path} (val or test may be missing, not both) when the folder
    already has a split, else None. Two folders for one split (``train/`` and ``Training/``) are refused:
    taking one would drop the other's images silently."""
    found: dict[str, list[os.DirEntry]] = defaultdict(list)
    for e in _listdir(root):
        split = _SPLIT_ALIASES.get(e.name.lower())
        if split is not None and e.is_dir():
            found[split].append(e)
    if "train" not in found or not ("val" in found or "test" in found):
        return None
    for split, entries in found.items():
        if len(entries) > 1:
            names = ", ".join(shown_folder(e.name) for e in entries)
            raise FolderNameClashError(f"the folders {names} all hold the {split} split: keep one of them")
    return {split: Path(entries[0].path) for split, entries in found.items()}


def _collect_files(
    root: Path, layout: dict[str, Path] | None, options: DatasetOptions
) -> tuple[list[tuple[str, str, str | None]], list[Skipped], list[str]]:
    """(relative path, class, split or None) for every candidate file, plus files skipped up front."""
    candidates: list[tuple[str, str, str | None]] = []
    skipped: list[Skipped] = []
    for rel, class_name, split, reason in walk_candidates(root, layout):
        if reason is not None:
            skipped.append(Skipped(rel, reason))
        else:
            candidates.append((rel, class_name, split))
    check_candidate_classes({c[1] for c in candidates}, {c[1] for c in candidates if c[0]})
    real = [c for c in candidates if c[0]]
    return real, skipped, ignored_folders(root, layout)


def ignored_folders(root: Path, layout: dict[str, Path] | None) -> list[str]:
    """The folders beside the split folders that are not a split (reported, never read)."""
    if not layout:
        return []
    return sorted(
        e.name
        for e in _listdir(root)
        if e.is_dir() and not is_junk(PurePosixPath(e.name)) and _SPLIT_ALIASES.get(e.name.lower()) not in layout
    )


def walk_candidates(root: Path, layout: dict[str, Path] | None) -> Iterator[tuple[str, str, str | None, str | None]]:
    """(relative path, class, split or None, None) for every candidate file, in order; (relative path, "",
    None, reason) for a file skipped up front; ("", class, split, None) for a class folder with no file
    (an empty class folder still names a class: the check reports it clearly)."""
    tops = layout.items() if layout else [(None, root)]
    for split, top in tops:
        for entry in _listdir(top):
            rel_top = PurePosixPath(entry.path).relative_to(PurePosixPath(root))
            if is_junk(PurePosixPath(entry.name)):
                continue
            if entry.is_file(follow_symlinks=False):
                yield str(rel_top), "", None, "not inside a class folder"
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            class_name = entry.name
            found_any = False
            for path in _walk_files(Path(entry.path)):
                rel = PurePosixPath(path).relative_to(PurePosixPath(root))
                if is_junk(rel):
                    continue
                found_any = True
                yield str(rel), class_name, split, None
            if not found_any:
                yield "", class_name, split, None


def check_candidate_classes(named: set[str], with_files: set[str]) -> None:
    """``named``: every class folder; ``with_files``: those holding a candidate file."""
    check_distinct_folders(named)
    empty_classes = named - with_files
    if empty_classes:
        name = min(empty_classes)
        raise DatasetError(f"class {name!r} has no usable image (its folder is empty)")


def _walk_files(top: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not is_junk(PurePosixPath(d)))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                yield full


def _verify_all(
    root: Path,
    candidates: list[tuple[str, str, str | None]],
    options: DatasetOptions,
    store: StoreFill | None,
    progress: ProgressFn | None,
) -> list[tuple[str, int, int] | str]:
    """Decode each file once. Returns (sha, w, h) or a reason, for each candidate."""
    return list(verify_files(root, (c[0] for c in candidates), len(candidates), options, store, progress))


def verify_files(
    root: Path,
    rels: Iterable[str],
    total: int,
    options: DatasetOptions,
    store: StoreFill | None,
    progress: ProgressFn | None,
) -> Iterator[tuple[str, int, int] | str]:
    """Decode each file once (threads: Pillow and hashlib release the GIL); yields (sha, w, h) or a reason,
    in order. At most a few files per thread are in flight, so memory stays flat however many files there
    are."""
    from .loader import ordered_map

    def check(rel: str) -> tuple[str, int, int] | str:
        path = root / rel
        try:
            size = path.stat().st_size
            if size > options.max_file_bytes:
                return f"file is {size} bytes, over the limit of {options.max_file_bytes}"
            data = path.read_bytes()
        except OSError as e:
            return f"cannot read file: {e.strerror or e}"
        sha = hashlib.sha256(data).hexdigest()
        try:
            if store is None:
                _, (w, h) = decode_for_size(data, _VERIFY_SIZE, max_pixels=options.max_pixels)
                return sha, w, h
            known = store.known(sha)
            if known is not None and known.orig_width * known.orig_height <= options.max_pixels:
                return sha, known.orig_width, known.orig_height
            pixels, (w, h) = stored_pixels(data, store.tier, max_pixels=options.max_pixels)
            store.add(sha, pixels, (w, h))
        except ImageError as e:
            return str(e)
        return sha, w, h

    workers = options.workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, outcome in enumerate(ordered_map(pool, check, rels, ahead=4 * workers), 1):
            yield outcome
            if progress is not None and (i == total or i % 16 == 0):
                progress(i, total)


def _check_classes(classes: list[str], samples: list[tuple], explicit: bool) -> None:
    if len(classes) < 2:
        found = f"found {len(classes)}: {classes}" if classes else "found none"
        raise DatasetError(f"a dataset needs at least 2 classes (one sub-folder per class), {found}")
    per_class: Counter[str] = Counter(s[1] for s in samples)
    train_per_class: Counter[str] = Counter(s[1] for s in samples if (s[2] or "train") == "train")
    for name in classes:
        if per_class[name] == 0:
            raise DatasetError(f"class {name!r} has no usable image (every file was skipped; see the report)")
        if explicit and train_per_class[name] == 0:
            raise DatasetError(f"class {name!r} has no usable image in train/")
        if not explicit and len({s[3] for s in samples if s[1] == name}) < 2:
            raise DatasetError(
                f"class {name!r} has only 1 distinct usable image; at least 2 are needed "
                "(one to train on, one to validate with)"
            )


def _stratified_split(
    raw: list[tuple[str, str, str | None, str, int, int]], label_of: dict[str, int], options: DatasetOptions
) -> list[Sample]:
    """Seeded per-class split in which every class reaches val. Byte-identical files stay together,
    so a duplicate never lands on both sides of the split."""
    rng = random.Random(options.seed)
    by_class: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for item in raw:
        by_class[item[1]][item[3]].append(item)
    samples: list[Sample] = []
    for name in sorted(by_class):
        groups = [by_class[name][sha] for sha in sorted(by_class[name])]
        rng.shuffle(groups)
        n = len(groups)
        n_val = max(1, round(n * options.val_fraction))
        n_test = round(n * options.test_fraction) if options.test_fraction > 0 else 0
        n_test = max(0, min(n_test, n - n_val - 1))
        for i, group in enumerate(groups):
            split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            samples.extend(Sample(r, label_of[c], split, sha, w, h) for r, c, _, sha, w, h in group)
    return samples


def _class_warnings(ds: Dataset) -> list[Warning_]:
    return count_warnings(ds.counts())


def count_warnings(counts: dict[str, dict[str, int]]) -> list[Warning_]:
    """Imbalanced, small and val-less classes, from ``Dataset.counts()``."""
    totals = {c: sum(v.values()) for c, v in counts.items()}
    warnings: list[Warning_] = []
    biggest, smallest = max(totals.values()), min(totals.values())
    if smallest and biggest / smallest > IMBALANCE_RATIO:
        big = max(totals, key=lambda c: totals[c])
        small = min(totals, key=lambda c: totals[c])
        warnings.append(
            Warning_(
                "class_imbalance",
                f"classes are imbalanced over {IMBALANCE_RATIO:.0f}:1 ({big!r} has {biggest} images, "
                f"{small!r} has {smallest})",
            )
        )
    for c, n in totals.items():
        if n < SMALL_CLASS:
            warnings.append(Warning_("small_class", f"class {c!r} has only {n} images (fewer than {SMALL_CLASS})"))
    for c, v in counts.items():
        if v["val"] == 0:
            warnings.append(Warning_("missing_in_val", f"class {c!r} has no image in val"))
    return warnings


def _duplicates(ds: Dataset) -> tuple[list[list[str]], list[Warning_]]:
    by_sha: dict[str, list[Sample]] = defaultdict(list)
    for s in ds.samples:
        by_sha[s.sha256].append(s)
    groups = [g for g in by_sha.values() if len(g) > 1]
    warnings: list[Warning_] = []
    if groups:
        extra = sum(len(g) - 1 for g in groups)
        warnings.append(Warning_("duplicates", f"{extra} byte-identical duplicate file(s) in {len(groups)} group(s)"))
    cross = [g for g in groups if len({s.split for s in g}) > 1]
    if cross:
        example = ", ".join(ds.display(s.path) for s in cross[0][:2])
        warnings.append(
            Warning_(
                "duplicates_across_splits",
                f"{len(cross)} image(s) appear both in train and in val/test (e.g. {example}): "
                "validation scores will be optimistic",
            )
        )
    conflicting = [g for g in groups if len({s.label for s in g}) > 1]
    if conflicting:
        example = ", ".join(ds.display(s.path) for s in conflicting[0][:2])
        warnings.append(
            Warning_(
                "conflicting_labels", f"{len(conflicting)} image(s) appear in more than one class (e.g. {example})"
            )
        )
    return [sorted(s.path for s in g) for g in sorted(groups, key=lambda g: min(s.path for s in g))], warnings


def _size_stats(widths: list[int], heights: list[int]) -> dict:
    if not widths:
        return {}

    def stats(values: list[int]) -> dict:
        return {
            "min": min(values),
            "median": statistics.median(values),
            "max": max(values),
            "mean": round(statistics.fmean(values), 1),
        }

    return {"width": stats(widths), "height": stats(heights)}


def _listdir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except NotADirectoryError:
        raise DatasetError(f"{path} is not a folder") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
