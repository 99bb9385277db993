"""The upload check keeps no per-image objects: its peak memory does not grow with the number of images."""

from __future__ import annotations

import gc
import io
import shutil
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from finetune import archive, datacheck
from finetune.archive import StoredNames, extract_zip
from finetune.datacheck import check_folder
from finetune.datastore import StoreFill, open_store

from .helpers import distinct_pngs

PNGS = distinct_pngs(64, size=8)


def _zip(path: Path, n: int) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):  # distinct files (bytes after the image end): no duplicate groups to report
            name = f"digits/class{i % 4}/part{i // 200}/image-{i:06d}.png"  # folders are listed whole: keep them small
            zf.writestr(name, PNGS[i % 64] + i.to_bytes(4, "big"))
    path.write_bytes(buffer.getvalue())
    return path


def _peak(tmp: Path, archive: Path) -> int:
    """Python's peak allocation while a zip is extracted under stored names, checked and its pixels staged."""
    work = tmp / "work"
    shutil.rmtree(work, ignore_errors=True)
    store = open_store(work / "cache", max_bytes=1 << 30)
    gc.collect()
    tracemalloc.start()
    try:
        names = StoredNames()
        images = extract_zip(archive, work / "images", rename=names)
        names.close()
        writer = store.writer(staged=True)
        with check_folder(images, store=StoreFill(store, 64, writer, strict=False)) as checked:
            n = sum(1 for _ in checked.files())
        writer.abort()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert n > 0


def test_the_check_of_an_upload_keeps_no_per_image_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Records move in batches, the zip's directory is read in blocks: keep them smaller than the datasets.
    monkeypatch.setattr(datacheck, "_BATCH", 64)
    monkeypatch.setattr(archive, "_DIRECTORY_BUFFER", 4096)
    small, big = _zip(tmp_path / "small.zip", 500), _zip(tmp_path / "big.zip", 2000)
    _peak(tmp_path, big)  # first use: imports, caches and interned names settle
    small_peak = _peak(tmp_path, small)
    big_peak = min(_peak(tmp_path, big) for _ in range(2))
    per_image = (big_peak - small_peak) / 1500
    # Per-image Python objects (a file list, a dict per file, a set of keys) cost 1-2 KB an image.
    assert per_image < 50, f"{per_image:.0f} bytes of Python objects per extra image"
