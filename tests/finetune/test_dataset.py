"""Dataset input: every bad input gets its own clear error, bad files are skipped and reported, and the
split is seeded, stratified and keeps duplicates together."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.archive import ArchiveLimits
from finetune.datacheck import check_folder
from finetune.dataset import Dataset, DatasetOptions, load_dataset
from finetune.datastore import load_into_store, open_store
from finetune.errors import ConfigError, DatasetError, FolderNameClashError, UnsafeArchiveError

from .helpers import (
    distinct_pngs,
    image_bytes,
    make_shapes_dataset,
    png_with_claimed_size,
    set_encrypted_flag,
    solid,
    symlink_entry,
    write_zip,
)


def build(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``{relative path: bytes}`` under ``root``; a path ending in '/' makes an empty folder."""
    for rel, data in files.items():
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def two_classes(n: int = 4, seed: int = 0) -> dict[str, bytes]:
    pngs = distinct_pngs(2 * n, seed=seed)
    return {f"{'red' if i < n else 'blue'}/{i:02d}.png": d for i, d in enumerate(pngs)}


def load(root: Path, **options: object) -> Dataset:
    """``load_dataset``, checking on the way that the service's flat-memory check (``check_folder``) gives
    the same report, file list and errors."""
    opts = DatasetOptions(**options)  # type: ignore[arg-type]
    comparable = root.is_dir() and opts.files is None and not opts.evaluate_only  # what uploads are checked with
    try:
        ds = load_dataset(root, options=opts)
    except Exception as e:
        if not isinstance(e, ConfigError) and comparable:
            with pytest.raises(type(e)) as streamed:
                check_folder(root, options=opts).close()
            assert str(streamed.value) == str(e)
        raise
    if comparable:
        with check_folder(root, options=opts) as checked:
            expected = ds.report()
            assert list(checked.files()) == expected.pop("files")
            assert checked.report == expected
    return ds


# -- datasets that cannot be used ------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset not found"):
        load(tmp_path / "nope")


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    one = build(tmp_path / "one", {f"red/{i}.png": d for i, d in enumerate(distinct_pngs(3))})
    with pytest.raises(DatasetError, match=r"at least 2 classes .*found 1: \['red'\]"):
        load(one)
    loose = build(tmp_path / "loose", {f"{i}.png": d for i, d in enumerate(distinct_pngs(3))})
    with pytest.raises(DatasetError, match=r"at least 2 classes .*found none"):
        load(loose)
    empty = build(tmp_path / "empty", {"nothing/": b""})
    with pytest.raises(DatasetError, match="class 'nothing' has no usable image"):
        load(empty)


def test_empty_class_folder(tmp_path: Path) -> None:
    root = build(tmp_path / "d", {**two_classes(), "green/": b""})
    with pytest.raises(DatasetError, match=r"class 'green' has no usable image .*empty"):
        load(root)


def test_class_with_only_os_junk_counts_as_empty(tmp_path: Path) -> None:
    root = build(tmp_path / "d", {**two_classes(), "green/.DS_Store": b"x", "green/Thumbs.db": b"y"})
    with pytest.raises(DatasetError, match="class 'green' has no usable image"):
        load(root)


def test_class_whose_every_file_is_corrupt(tmp_path: Path) -> None:
    good = image_bytes(solid((1, 2, 3), (20, 20)))
    root = build(tmp_path / "d", {**two_classes(), "green/a.png": good[:40], "green/b.jpg": b"nope"})
    with pytest.raises(DatasetError, match=r"class 'green' has no usable image .*every file was skipped"):
        load(root)


def test_class_needs_two_distinct_images_to_split(tmp_path: Path) -> None:
    (one,) = distinct_pngs(1, seed=9)
    root = build(tmp_path / "d", {**two_classes(), "green/a.png": one, "green/a-copy.png": one})
    with pytest.raises(DatasetError, match="class 'green' has only 1 distinct usable image"):
        load(root)


def test_explicit_split_needs_every_class_in_train(tmp_path: Path) -> None:
    a, b, c = distinct_pngs(3)
    root = build(tmp_path / "d", {"train/red/a.png": a, "val/red/b.png": b, "val/blue/c.png": c})
    with pytest.raises(DatasetError, match="class 'blue' has no usable image in train/"):
        load(root)


def test_zip_needs_an_extract_dir(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "d.zip", list(two_classes().items()))
    with pytest.raises(DatasetError, match="extract_dir"):
        load_dataset(archive)


def _bad_zip(kind: str, path: Path) -> Path:
    files = list(two_classes().items())
    if kind == "empty":
        return write_zip(path, [])
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 definitely not a zip")
        return path
    if kind == "dotdot":
        return write_zip(path, [*files, ("red/../../escape.png", files[0][1])])
    if kind == "absolute":
        return write_zip(path, [*files, ("/etc/cron.d/escape.png", files[0][1])])
    if kind == "symlink":
        return write_zip(path, [*files, (symlink_entry("red/link.png"), b"../../../etc/passwd")])
    if kind == "encrypted":
        write_zip(path, files)
        set_encrypted_flag(path)
        return path
    if kind == "bomb":
        return write_zip(path, [*files, ("red/bomb.png", bytes(3 * 1024**2))])
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("empty", DatasetError, "empty zip"),
        ("corrupt", DatasetError, "not a valid zip"),
        ("dotdot", UnsafeArchiveError, r"\.\."),
        ("absolute", UnsafeArchiveError, "absolute path"),
        ("symlink", UnsafeArchiveError, "link"),
        ("encrypted", UnsafeArchiveError, "encrypted"),
        ("bomb", UnsafeArchiveError, "zip bomb"),
    ],
)
def test_bad_zip_datasets(tmp_path: Path, kind: str, error: type[Exception], match: str) -> None:
    archive = _bad_zip(kind, tmp_path / f"{kind}.zip")
    extract = tmp_path / "extracted"
    with pytest.raises(error, match=match):
        load_dataset(archive, extract_dir=extract)
    leftovers = list(extract.iterdir()) if extract.exists() else []
    assert leftovers == []  # nothing half-extracted that a later load would trust
    assert not (tmp_path / "escape.png").exists()


def test_zip_bomb_refused_by_small_total_cap(tmp_path: Path) -> None:
    files = list(two_classes(n=3).items())
    archive = write_zip(tmp_path / "d.zip", files)
    limits = ArchiveLimits(max_total_bytes=sum(len(d) for _, d in files) // 2)
    with pytest.raises(UnsafeArchiveError, match="in total"):
        load_dataset(archive, options=DatasetOptions(archive_limits=limits), extract_dir=tmp_path / "x")


def test_bad_options_are_config_errors(tmp_path: Path) -> None:
    root = build(tmp_path / "d", two_classes())
    with pytest.raises(ConfigError) as e:
        load(root, val_fraction=0, test_fraction=-0.1)
    assert len(e.value.problems) == 2
    with pytest.raises(ConfigError, match="at least 10%"):
        load(root, val_fraction=0.5, test_fraction=0.45)


# -- files that are skipped --------------------------------------------------------------------------------


def test_bad_files_are_skipped_and_reported_never_fatal(tmp_path: Path) -> None:
    good = image_bytes(solid((10, 200, 10), (32, 32)))
    jpeg = image_bytes(solid((10, 200, 10), (64, 64)), "JPEG")
    bad = {
        "red/truncated.png": good[: len(good) // 2],
        "red/truncated.jpg": jpeg[: len(jpeg) // 2],
        "red/notes.txt": b"not an image",
        "red/empty.png": b"",
        "red/scan.tif": image_bytes(solid((1, 1, 1), (8, 8)), "TIFF"),
        "blue/bomb.png": png_with_claimed_size(100_000, 100_000),
        "blue/huge.png": png_with_claimed_size(30_000, 30_000),
        "stray.png": good,  # not inside a class folder
    }
    root = build(tmp_path / "d", {**two_classes(), **bad})
    ds = load(root)
    reasons = {s.path: s.reason for s in ds.skipped}
    assert set(reasons) == set(bad)
    assert "truncated" in reasons["red/truncated.png"]
    assert "truncated" in reasons["red/truncated.jpg"]
    assert "not an image" in reasons["red/notes.txt"]
    assert "not an image" in reasons["red/empty.png"]
    assert "not an image" in reasons["red/scan.tif"]
    assert "decompression bomb" in reasons["blue/bomb.png"]
    assert "pixels" in reasons["blue/huge.png"]
    assert reasons["stray.png"] == "not inside a class folder"
    assert len(ds.samples) == 8
    report = ds.report()
    assert {"path": "red/notes.txt", "reason": reasons["red/notes.txt"]} in report["skipped"]
    assert "skipped_files" in {w["code"] for w in report["warnings"]}


def test_pixel_and_file_size_limits_skip_files(tmp_path: Path) -> None:
    small = distinct_pngs(8, size=8)
    root = build(
        tmp_path / "d",
        {
            **{f"red/{i}.png": d for i, d in enumerate(small[:4])},
            **{f"blue/{i}.png": d for i, d in enumerate(small[4:])},
            "red/big.png": image_bytes(solid((1, 2, 3), (40, 40))),  # 1600 pixels
            "blue/noise.png": distinct_pngs(1, size=64, seed=5)[0],  # ~12 KB
        },
    )
    ds = load(root, max_pixels=1000, max_file_bytes=5000)
    reasons = {s.path: s.reason for s in ds.skipped}
    assert "over the limit of 1000" in reasons["red/big.png"]
    assert "bytes, over the limit of 5000" in reasons["blue/noise.png"]


def test_every_mode_and_format_is_usable(tmp_path: Path) -> None:
    p = Image.new("P", (20, 20), 1)
    p.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    frames = [solid((0, 0, 250), (20, 20)), solid((250, 0, 0), (20, 20))]
    files = {
        "a/mode1.png": image_bytes(Image.new("1", (20, 20), 1)),
        "a/modeL.png": image_bytes(Image.new("L", (20, 20), 100)),
        "a/modeLA.png": image_bytes(Image.new("LA", (20, 20), (100, 50))),
        "a/modeP.png": image_bytes(p, transparency=0),
        "a/modeRGBA.png": image_bytes(Image.new("RGBA", (20, 20), (1, 2, 3, 4))),
        "b/cmyk.jpg": image_bytes(Image.new("CMYK", (20, 20), (0, 255, 0, 0)), "JPEG"),
        "b/i16.png": image_bytes(Image.new("I;16", (20, 20), 40000)),
        "b/anim.gif": image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "b/x.webp": image_bytes(solid((5, 6, 7), (20, 20)), "WEBP"),
        "b/x.bmp": image_bytes(solid((8, 9, 10), (20, 20)), "BMP"),
    }
    root = build(tmp_path / "d", files)
    with load_into_store(root, cache_root=tmp_path / "cache", tier=32) as stored:
        ds = stored.dataset
        assert ds.skipped == []
        assert sorted(s.path for s in ds.samples) == sorted(files)
        for s in ds.samples:
            assert (s.width, s.height) == (20, 20)
            entry = stored.store.find(s.sha256, 20)  # stored at its own size, never upscaled to the tier
            assert entry is not None
            arr = stored.store.array(entry)
            assert arr.shape == (20, 20, 3) and arr.dtype == np.uint8
        gif = next(s for s in ds.samples if s.path.endswith(".gif"))
        entry = stored.store.find(gif.sha256, 20)
        assert entry is not None and stored.store.array(entry)[10, 10, 2] > 200  # the first frame (blue)


def test_os_junk_is_ignored_silently(tmp_path: Path) -> None:
    junk = {
        "__MACOSX/red/._00.png": b"\x00\x05\x16\x07",
        ".DS_Store": b"finder",
        "red/.DS_Store": b"finder",
        "red/Thumbs.db": b"explorer",
        "red/._00.png": b"apple double",
        "blue/.hidden/x.png": distinct_pngs(1, seed=7)[0],
        ".git/": b"",
        "desktop.ini": b"[.ShellClassInfo]",
    }
    root = build(tmp_path / "d", {**two_classes(), **junk})
    ds = load(root)
    assert ds.classes == ["blue", "red"]
    assert ds.skipped == []
    assert len(ds.samples) == 8
    assert not any(w.code == "skipped_files" for w in ds.warnings)


def test_nested_folders_belong_to_their_class(tmp_path: Path) -> None:
    pngs = distinct_pngs(6)
    root = build(
        tmp_path / "d",
        {
            "red/a.png": pngs[0],
            "red/2019/b.png": pngs[1],
            "red/2019/june/c.png": pngs[2],
            "blue/x/y/z/d.png": pngs[3],
            "blue/e.png": pngs[4],
        },
    )
    ds = load(root)
    by_path = {s.path: ds.classes[s.label] for s in ds.samples}
    assert by_path == {
        "red/a.png": "red",
        "red/2019/b.png": "red",
        "red/2019/june/c.png": "red",
        "blue/x/y/z/d.png": "blue",
        "blue/e.png": "blue",
    }


def test_existing_split_is_kept(tmp_path: Path) -> None:
    pngs = iter(distinct_pngs(14))
    files = {}
    for split, n in (("training", 4), ("validation", 2), ("test", 1)):
        for cls in ("red", "blue"):
            for i in range(n):
                files[f"{split}/{cls}/{i}.png"] = next(pngs)
    files["extras/red/x.png"] = distinct_pngs(1, seed=3)[0]
    ds = load(build(tmp_path / "d", files))
    assert ds.explicit_split
    expected = {"training": "train", "validation": "val", "test": "test"}
    assert {s.path: s.split for s in ds.samples} == {p: expected[p.split("/")[0]] for p in files if "extras" not in p}
    assert ds.counts() == {"blue": {"train": 4, "val": 2, "test": 1}, "red": {"train": 4, "val": 2, "test": 1}}
    assert [w.code for w in ds.warnings if w.code == "ignored_folder"] == ["ignored_folder"]
    assert ds.report()["split"] == "explicit"


def test_zip_with_a_wrapper_folder_and_junk(tmp_path: Path) -> None:
    entries = [(f"flowers/{k}", v) for k, v in two_classes().items()]
    entries += [("__MACOSX/flowers/red/._00.png", b"x"), ("flowers/.DS_Store", b"y")]
    archive = write_zip(tmp_path / "flowers.zip", entries)
    extract = tmp_path / "extracted"
    ds = load_dataset(archive, extract_dir=extract)
    assert ds.classes == ["blue", "red"]
    assert len(ds.samples) == 8 and ds.skipped == []
    # Extracted once, under the archive's content hash: a second load reuses it.
    (target,) = list(extract.iterdir())
    marker = target / "flowers" / "red" / "00.png"
    stamp = marker.stat().st_mtime_ns
    again = load_dataset(archive, extract_dir=extract)
    assert again.fingerprint == ds.fingerprint
    assert marker.stat().st_mtime_ns == stamp and len(list(extract.iterdir())) == 1


# -- the split and the report ------------------------------------------------------------------------------


def _split_of(ds: Dataset) -> dict[str, str]:
    return {s.path: s.split for s in ds.samples}


def test_stratified_split_is_seeded_and_reaches_every_class(tmp_path: Path) -> None:
    root = make_shapes_dataset(tmp_path / "d", per_class=20, size=16)
    pngs = distinct_pngs(3, seed=11)
    build(root, {f"tiny/{i}.png": d for i, d in enumerate(pngs)})  # a class of 3 still reaches val
    a, b = load(root, seed=3), load(root, seed=3)
    assert _split_of(a) == _split_of(b)
    assert a.fingerprint == b.fingerprint
    assert _split_of(load(root, seed=4)) != _split_of(a)
    counts = a.counts()
    for name, c in counts.items():
        assert c["val"] >= 1, name
        assert c["train"] >= 1, name
    assert counts["circle"] == {"train": 16, "val": 2, "test": 2}
    assert counts["tiny"]["train"] + counts["tiny"]["val"] + counts["tiny"]["test"] == 3
    assert not a.explicit_split


def test_duplicates_stay_in_one_split_and_are_reported(tmp_path: Path) -> None:
    files = two_classes(n=12)
    originals = [k for k in files if k.startswith("red/")][:5]
    for k in originals:  # five images, each present twice (or thrice) under other names
        files[k.replace(".png", "-copy.png")] = files[k]
    files["red/nested/third.png"] = files[originals[0]]
    root = build(tmp_path / "d", files)
    for seed in range(8):
        ds = load(root, seed=seed, val_fraction=0.3, test_fraction=0.2)
        splits = _split_of(ds)
        assert len(ds.duplicates) == 5
        for group in ds.duplicates:
            assert len({splits[p] for p in group}) == 1, (seed, group)
    assert sorted(ds.duplicates[0]) == sorted(["red/00.png", "red/00-copy.png", "red/nested/third.png"])
    codes = {w.code for w in ds.warnings}
    assert "duplicates" in codes and "duplicates_across_splits" not in codes


def test_same_image_in_two_classes_is_a_warning(tmp_path: Path) -> None:
    files = two_classes(n=5)
    files["blue/stolen.png"] = files["red/00.png"]
    ds = load(build(tmp_path / "d", files))
    assert "conflicting_labels" in {w.code for w in ds.warnings}


def test_report_is_json_with_counts_sizes_warnings_and_files(tmp_path: Path) -> None:
    rng = random.Random(0)
    files = {}
    for i in range(22):
        w, h = rng.randint(20, 60), rng.randint(20, 60)
        files[f"many/{i:02d}.png"] = image_bytes(Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)))
    for i in range(2):
        files[f"few/{i}.png"] = distinct_pngs(2, seed=40 + i)[i]
    files["many/broken.png"] = b"\x89PNG broken"
    root = build(tmp_path / "d", files)
    ds = load(root)
    report = json.loads(json.dumps(ds.report()))
    assert report["classes"] == ["few", "many"]
    assert report["num_images"] == 24
    assert report["split"] == "stratified"
    assert sum(report["counts"]["many"].values()) == 22
    assert report["split_totals"]["train"] + report["split_totals"]["val"] + report["split_totals"]["test"] == 24
    assert report["skipped"] == [{"path": "many/broken.png", "reason": report["skipped"][0]["reason"]}]
    widths = [s.width for s in ds.samples]
    assert report["image_size"]["width"]["min"] == min(widths)
    assert report["image_size"]["width"]["max"] == max(widths)
    assert set(report["image_size"]["height"]) == {"min", "median", "max", "mean"}
    codes = Counter(w["code"] for w in report["warnings"])
    assert codes["class_imbalance"] == 1  # 22 vs 2 images: over 10:1
    assert codes["small_class"] == 1  # "few" (< 10 images); "many" has 22
    assert codes["skipped_files"] == 1
    assert {f["path"] for f in report["files"]} == {s.path for s in ds.samples}
    assert all(f["split"] in ("train", "val", "test") and f["class"] in ("few", "many") for f in report["files"])
    assert "files" not in ds.report(include_files=False)
    assert len(report["fingerprint"]) == 64


def test_no_imbalance_warning_at_ten_to_one(tmp_path: Path) -> None:
    pngs = distinct_pngs(22)
    files = {f"many/{i}.png": d for i, d in enumerate(pngs[:20])}
    files.update({f"few/{i}.png": d for i, d in enumerate(pngs[20:])})
    codes = {w.code for w in load(build(tmp_path / "d", files)).warnings}
    assert "class_imbalance" not in codes  # exactly 10:1 is allowed


def test_evaluate_only_puts_everything_in_test(tmp_path: Path) -> None:
    (a,) = distinct_pngs(1)
    ds = load(build(tmp_path / "d", {"red/a.png": a}), evaluate_only=True)  # one class is fine here
    assert [(s.path, s.split) for s in ds.samples] == [("red/a.png", "test")]


def test_progress_is_reported(tmp_path: Path) -> None:
    root = build(tmp_path / "d", two_classes(n=20))
    seen: list[tuple[int, int]] = []
    load_dataset(root, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (40, 40)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_store_entries_and_a_lost_catalog(tmp_path: Path) -> None:
    root = build(tmp_path / "d", two_classes(n=3))
    with load_into_store(root, cache_root=tmp_path / "cache", tier=32) as stored:
        s = stored.dataset.samples[0]
        entry = stored.store.find(s.sha256, 16)
        assert entry is not None and (entry.orig_width, entry.orig_height) == (16, 16)
        assert stored.store.array(entry).shape == (16, 16, 3)
        before = stored.store.array(entry).copy()
    # The shards describe themselves: a lost catalog is rebuilt from them, nothing is decoded again.
    (tmp_path / "cache" / "pixelstore" / "catalog.sqlite").unlink()
    for extra in (tmp_path / "cache" / "pixelstore").glob("catalog.sqlite-*"):
        extra.unlink()
    store = open_store(tmp_path / "cache")
    entry = store.find(s.sha256, 16)
    assert entry is not None and np.array_equal(store.array(entry), before)
    store.close()


def test_train_and_test_folders_without_val_take_val_from_train(tmp_path: Path) -> None:
    from PIL import Image

    for split, n in (("train", 10), ("test", 3)):
        for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 20), colour).save(folder / f"{i}.png")
    ds = load_dataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    counts = ds.counts()
    for cls in ("cat", "dog"):
        assert counts[cls]["test"] == 3
        assert counts[cls]["val"] >= 1
        assert counts[cls]["train"] + counts[cls]["val"] == 10
    assert all(s.path.startswith("test/") for s in ds.split("test"))
    assert all(s.path.startswith("train/") for s in ds.split("val"))


def test_a_lone_train_folder_is_split_into_train_val_and_test(tmp_path: Path) -> None:
    """A zip of only ``train/<class>/...`` once read as one class named 'train' and was refused."""
    pngs = iter(distinct_pngs(20))
    files = {f"train/{cls}/{i}.png": next(pngs) for cls in ("cat", "dog") for i in range(10)}
    for source in (build(tmp_path / "plain", files), write_zip(tmp_path / "t.zip", list(files.items()))):
        ds = load_dataset(source, extract_dir=tmp_path / "extracted")
        assert ds.classes == ["cat", "dog"] and ds.root.name == "train"
        counts = ds.counts()
        assert all(c["train"] == 8 and c["val"] == 1 and c["test"] == 1 for c in counts.values()), counts
        assert ds.report()["split"] == "stratified"


def test_two_folders_for_one_split_are_refused(tmp_path: Path) -> None:
    pngs = iter(distinct_pngs(12))
    files = {f"{split}/{c}/{i}.png": next(pngs) for split in ("train", "Training", "val") for c in "ab" for i in (0, 1)}
    with pytest.raises(FolderNameClashError, match="the folders 'Training', 'train' all hold the train split"):
        load(build(tmp_path / "d", files))


# -- a recorded list of images and their split ---------------------------------------------------------------


def test_a_recorded_split_is_used_exactly_and_nothing_else_is_read(tmp_path: Path) -> None:
    root = build(tmp_path / "d", two_classes(n=10))
    first = load(root, seed=3)
    recorded = {s.path: s.split for s in first.samples if s.path != "red/00.png"}  # one image left out
    again = load(root, seed=99, val_fraction=0.4, files=recorded)  # another seed: ignored, the record rules
    assert {s.path: s.split for s in again.samples} == recorded
    assert again.report()["recorded_split"] is True and again.skipped == []


def test_a_recorded_list_without_splits_is_split_with_the_runs_options(tmp_path: Path) -> None:
    root = build(tmp_path / "d", two_classes(n=10))
    listed = {f"red/{i:02d}.png": None for i in range(1, 10)} | {f"blue/{i:02d}.png": None for i in range(10, 20)}
    a = load(root, seed=5, files=listed)
    assert {s.path for s in a.samples} == set(listed) and not a.report()["recorded_split"]
    assert {s.path: s.split for s in a.samples} == {s.path: s.split for s in load(root, seed=5, files=listed).samples}
    assert {s.path: s.split for s in a.samples} != {s.path: s.split for s in load(root, seed=6, files=listed).samples}


def test_a_recorded_file_that_disappeared_is_an_error(tmp_path: Path) -> None:
    root = build(tmp_path / "d", two_classes(n=4))
    recorded = {s.path: s.split for s in load(root).samples}
    (root / "red" / "00.png").unlink()
    with pytest.raises(DatasetError, match="not in the dataset folder any more"):
        load(root, files=recorded)


def test_a_split_file_is_read_line_by_line(tmp_path: Path) -> None:
    from finetune.dataset import read_split_file

    path = tmp_path / "split.jsonl"
    path.write_text('{"stored": "a/1.png", "path": "A/1.png", "split": "val"}\n{"path": "b/2.png", "split": null}\n')
    assert read_split_file(path) == {"a/1.png": "val", "b/2.png": None}
    path.write_text('{"stored": "a/1.png"}\nnot json\n')
    with pytest.raises(DatasetError, match="line 2"):
        read_split_file(path)
