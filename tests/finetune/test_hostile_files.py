"""Hostile files against the engine: archives, image files and weights files made to hurt, all generated
here (no committed bomb). Each is refused with its own error before it costs memory or touches a path it
should not; what is only odd (a 1x1 image, a 1x5000 strip) is handled without a crash, training included."""

from __future__ import annotations

import io
import json
import re
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from finetune.archive import (
    NAMES_FILE,
    StoredNames,
    clean_folder_name,
    extract_zip,
    read_names,
)
from finetune.dataset import load_dataset
from finetune.errors import DatasetError, FolderNameClashError, ImageError, UnsafeArchiveError, WeightsError
from finetune.images import decode_for_size, open_image, to_rgb
from finetune.models import LeNet, build_model
from finetune.pixelcache import PixelCache
from finetune.weights import MAX_HEADER_BYTES, load_state_file, read_safetensors_header

from .helpers import distinct_pngs, image_bytes, lenet_config, png_with_claimed_size, run_training, solid, write_zip

REPO = Path(__file__).resolve().parents[2]


# -- archives ---------------------------------------------------------------------------------------------


def typed_entry(name: str, file_type: int, create_system: int = 3) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = create_system
    info.external_attr = (file_type | 0o644) << 16
    return info


def patch_zip(path: Path, local_offset: int, central_offset: int, value: bytes) -> None:
    """Overwrite a field of every local and central header (zipfile clears flags it does not write)."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        start = 0
        while (i := data.find(signature, start)) != -1:
            data[i + offset : i + offset + len(value)] = value
            start = i + 4
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("../../canary.png", "outside"),
        ("C:\\canary.png", "absolute"),
        ("C:/canary.png", "absolute"),
        ("c:canary.png", "absolute"),
        ("..\\..\\canary.png", "outside"),
        ("red\\..\\..\\..\\canary.png", "outside"),
        ("\\\\server\\share\\canary.png", "absolute"),
        ("/tmp/canary.png", "absolute"),
        (typed_entry("red/link.png", stat.S_IFLNK), "link"),
        (typed_entry("red/link.png", stat.S_IFLNK, create_system=0), "link"),  # the bits, whatever the system
        (typed_entry("red/fifo.png", stat.S_IFIFO), "special"),
        (typed_entry("red/dev.png", stat.S_IFCHR), "special"),
        (typed_entry("red/dev.png", stat.S_IFBLK), "special"),
        (typed_entry("red/sock.png", stat.S_IFSOCK), "special"),
    ],
    ids=lambda v: repr(v.filename if isinstance(v, zipfile.ZipInfo) else v),
)
def test_hostile_entries_refuse_the_archive_and_write_nothing(
    tmp_path: Path, entry: str | zipfile.ZipInfo, match: str
) -> None:
    (a,) = distinct_pngs(1)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    archive = write_zip(tmp_path / "evil.zip", [("red/ok.png", a), (entry, b"/etc/passwd")])
    for rename in (None, StoredNames()):
        with pytest.raises(UnsafeArchiveError, match=match):
            extract_zip(archive, work / "out", rename=rename)
        assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "evil.zip"]
    assert not Path("/tmp/canary.png").exists()


@pytest.mark.parametrize(("local", "central", "value"), [(6, 8, b"\x41"), (8, 10, struct.pack("<H", 99))])
def test_encrypted_entries_are_refused(tmp_path: Path, local: int, central: int, value: bytes) -> None:
    """Strong encryption (flag bit 6) and WinZip AES (method 99), besides the classic bit 0."""
    (a,) = distinct_pngs(1)
    archive = write_zip(tmp_path / "enc.zip", [("red/a.png", a)])
    patch_zip(archive, local, central, value)
    with pytest.raises(UnsafeArchiveError, match="encrypted"):
        extract_zip(archive, tmp_path / "out", rename=StoredNames())
    assert not (tmp_path / "out").exists()


def test_stored_names_never_use_the_users_file_names(tmp_path: Path) -> None:
    pngs = distinct_pngs(6)
    users = [
        "red/<img src=x onerror=alert(1)>.png",
        "red/con.png",
        "red/x\ny.png",
        "blue/évil\u202egnp.exe",
        "cafe\u0301/a.png",  # decomposed é (as macOS writes it): stored as the composed "café"
        "cafe\u0301/b.png",
    ]
    archive = write_zip(tmp_path / "a.zip", list(zip(users, pngs, strict=True)))
    names = StoredNames()
    out = extract_zip(archive, tmp_path / "out", rename=names)
    stored = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != NAMES_FILE)
    assert stored == ["blue/000004", "café/000005", "café/000006", "red/000001", "red/000002", "red/000003"]
    assert read_names(out) == names.originals
    assert {names.originals[s] for s in stored} == set(users)
    for s in stored:  # each file is the user's file it claims to be
        assert (out / s).read_bytes() == pngs[users.index(names.originals[s])]


@pytest.mark.parametrize(
    ("folders", "shown"),
    [
        (["cat", "ca\u200dt"], ["'ca\\u200dt'", "'cat'"]),  # a zero-width joiner
        (["café", "cafe\u0301"], ["'café'", "'cafe\\u0301'"]),  # NFC and NFD, told apart in the message
        (["dog", "dog "], ["'dog'", "'dog '"]),
        (["x" * 100 + "a", "x" * 100 + "b"], ["'" + "x" * 100 + "a'", "'" + "x" * 100 + "b'"]),  # the 100-char cap
        (["train/cat", "train/ca\u200dt"], ["'ca\\u200dt'", "'cat'"]),  # below a split folder too
    ],
)
def test_folders_that_clean_up_to_one_name_are_refused_naming_both(
    tmp_path: Path, folders: list[str], shown: list[str]
) -> None:
    pngs = iter(distinct_pngs(2 * len(folders)))
    entries = [(f"{folder}/{i}.png", next(pngs)) for folder in folders for i in range(2)]
    archive = write_zip(tmp_path / "a.zip", entries)
    with pytest.raises(FolderNameClashError) as caught:
        extract_zip(archive, tmp_path / "out", rename=StoredNames())
    message = str(caught.value)
    assert all(name in message for name in shown), message
    assert not (tmp_path / "out").exists()
    # the engine on the same folders as they are on disk (the CLI): the same refusal, the same names
    extract_zip(archive, tmp_path / "plain")
    with pytest.raises(FolderNameClashError) as again:
        load_dataset(tmp_path / "plain")
    assert all(name in str(again.value) for name in shown), str(again.value)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("cafe\u0301", "café"),
        ("  padded\t", "padded"),
        ("tab\tand\nnewline", "tabandnewline"),
        ("bidi\u202eevil", "bidievil"),
        ("zero\u200bwidth", "zerowidth"),
        (" .hidden", "hidden"),
        ("<img src=x onerror=alert(1)>", "<img src=x onerror=alert(1)>"),  # kept: escaping is the pages' job
        ("x" * 300, "x" * 100),
    ],
)
def test_folder_names_are_normalised(raw: str, clean: str) -> None:
    assert clean_folder_name(raw) == clean


@pytest.mark.parametrize("raw", ["", " ", "\x01\x02", "\u202e", ".", "..", " . "])
def test_folder_names_that_clean_to_nothing_are_refused(raw: str) -> None:
    with pytest.raises(UnsafeArchiveError, match="empty"):
        clean_folder_name(raw)


def test_a_rename_hook_cannot_escape_either(tmp_path: Path) -> None:
    (a,) = distinct_pngs(1)
    archive = write_zip(tmp_path / "a.zip", [("red/a.png", a)])
    for bad in ("../../escape", "/tmp/escape", "red/.hidden"):
        with pytest.raises(UnsafeArchiveError, match=r"outside|absolute|renamed"):
            extract_zip(archive, tmp_path / "out", rename=lambda _rel, bad=bad: PurePosixPath(bad))
        assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape").exists()


def test_the_same_name_twice_is_refused_when_renaming(tmp_path: Path) -> None:
    a, b = distinct_pngs(2)
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = write_zip(tmp_path / "dup.zip", [("red/a.png", a), ("red/a.png", b)])
    with pytest.raises(UnsafeArchiveError, match="twice"):
        extract_zip(archive, tmp_path / "out", rename=StoredNames())


def nested_archives() -> dict[str, bytes]:
    """An inner zip, and a .tar.gz holding a symlink and a hardlink to /etc/passwd and an image."""
    (inner_png,) = distinct_pngs(1, seed=9)
    inner_zip = io.BytesIO()
    with zipfile.ZipFile(inner_zip, "w") as zf:
        zf.writestr("../../inner-escape.png", inner_png)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as tf:
        for name, kind in (("sym.png", tarfile.SYMTYPE), ("hard.png", tarfile.LNKTYPE)):
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, "/etc/passwd"
            tf.addfile(member)
        member = tarfile.TarInfo("../tar-escape.png")
        member.size = len(inner_png)
        tf.addfile(member, io.BytesIO(inner_png))
    return {"red/inner.zip": inner_zip.getvalue(), "red/photos.tar.gz": tar.getvalue()}


def test_nested_archives_are_never_opened_only_skipped(tmp_path: Path) -> None:
    pngs = distinct_pngs(8)
    files = {f"{'red' if i < 4 else 'blue'}/{i}.png": d for i, d in enumerate(pngs)} | nested_archives()
    archive = write_zip(tmp_path / "a.zip", list(files.items()))
    names = StoredNames()
    out = extract_zip(archive, tmp_path / "images", rename=names)
    ds = load_dataset(out)
    report = ds.report()
    assert {s["path"]: s["reason"] for s in report["skipped"]}.keys() == {"red/inner.zip", "red/photos.tar.gz"}
    assert all("not an image in an accepted format" in s["reason"] for s in report["skipped"])
    assert all(re.fullmatch(r"red/\d{6}", s["stored"]) for s in report["skipped"])
    on_disk = {p.name for p in tmp_path.rglob("*")}
    assert not on_disk & {"inner-escape.png", "tar-escape.png", "sym.png", "hard.png", "inner.zip", "photos.tar.gz"}
    assert len(ds.samples) == 8


# -- the dataset report maps stored names back -------------------------------------------------------------


def test_report_shows_original_names_and_where_they_are_stored(tmp_path: Path) -> None:
    pngs = distinct_pngs(8)
    files = {f"my photos/{'red' if i < 4 else 'blue'}/{i}.png": d for i, d in enumerate(pngs)}
    files["my photos/red/copy.png"] = pngs[0]
    files["my photos/red/notes.txt"] = b"not an image"
    archive = write_zip(tmp_path / "a.zip", list(files.items()))
    out = extract_zip(archive, tmp_path / "images", rename=StoredNames())
    ds = load_dataset(out)
    assert ds.root == out / "my photos"
    report = json.loads(json.dumps(ds.report()))
    shown = {f["path"]: f for f in report["files"]}
    assert set(shown) == {p.removeprefix("my photos/") for p in files if p.endswith(".png")}
    for path, f in shown.items():
        assert (ds.root / f["stored"]).read_bytes() == files[f"my photos/{path}"]
    assert [s["path"] for s in report["skipped"]] == ["red/notes.txt"]
    assert report["duplicates"] == [["red/0.png", "red/copy.png"]]
    dup_warning = next(w["message"] for w in report["warnings"] if w["code"] == "duplicates")
    assert "duplicate" in dup_warning
    # Names as stored (no names file): the report is unchanged from before, no "stored" key.
    (out / NAMES_FILE).unlink()
    plain = load_dataset(out).report()
    assert all("stored" not in f and re.fullmatch(r"(red|blue)/\d{6}", f["path"]) for f in plain["files"])


def test_a_broken_names_file_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / NAMES_FILE).write_text("[1, 2]")
    with pytest.raises(DatasetError, match="mapping"):
        read_names(tmp_path)


# -- images -----------------------------------------------------------------------------------------------


def psd_bytes(width: int = 4, height: int = 4) -> bytes:
    """A minimal valid Photoshop file (RGB, 8 bits, raw)."""
    header = b"8BPS" + struct.pack(">H", 1) + bytes(6) + struct.pack(">HIIHH", 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(3 * width * height)


def zip_of(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(name, data)
    return out.getvalue()


PNG = image_bytes(solid((200, 30, 30), (16, 16)))
JPEG = image_bytes(solid((200, 30, 30), (16, 16)), "JPEG")

# Real images in formats off the allow-list: (bytes, the Pillow format that would open them).
OFF_LIST = {
    "TIFF": (image_bytes(solid((1, 2, 3), (16, 16)), "TIFF"), "TIFF"),
    "ICO": (image_bytes(solid((1, 2, 3), (16, 16)), "ICO"), "ICO"),
    "PSD": (psd_bytes(), "PSD"),
    "EPS": (image_bytes(solid((1, 2, 3), (16, 16)), "EPS"), "EPS"),  # Ghostscript would run on it
    "PPM": (image_bytes(solid((1, 2, 3), (16, 16)), "PPM"), "PPM"),
    "TGA": (image_bytes(solid((1, 2, 3), (16, 16)), "TGA"), "TGA"),
    "DDS": (image_bytes(solid((1, 2, 3), (16, 16)), "DDS"), "DDS"),
    "PCX": (image_bytes(solid((1, 2, 3), (16, 16)), "PCX"), "PCX"),
}
# Documents and polyglots: refused whatever they are named.
NOT_IMAGES = {
    "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>',
    "PDF": image_bytes(solid((1, 2, 3), (16, 16)), "PDF"),
    "HTML": b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>",
    "HTML behind a PNG signature": b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>",
    "GIF/JavaScript": b"GIF89a/*\x00\x00*/=alert(1)//" + bytes(32),
    "zero bytes": b"",
}


def png_with_text(text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)  # a tEXt chunk right after the header: a valid PNG all the same
    return image_bytes(solid((200, 30, 30), (16, 16)), pnginfo=info)


# Valid images that are something else as well.
POLYGLOTS = {
    "PNG + zip (a GIFAR-style polyglot)": PNG + zip_of("evil.class", b"\xca\xfe\xba\xbe"),
    "JPEG + zip": JPEG + zip_of("evil.html", b"<script>alert(1)</script>"),
    "PNG that is a PDF": png_with_text("%PDF-1.7\n1 0 obj << >> endobj"),
    "PNG that is an HTML page": png_with_text("<html><script>alert(1)</script></html>"),
}


@pytest.fixture
def opened_formats(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every Pillow format plugin that looks at a file (their ``accept`` or their factory)."""
    Image.init()
    seen: list[str] = []
    for fmt, (factory, accept) in list(Image.OPEN.items()):

        def wrapped_factory(*args: Any, _f: Callable[..., Any] = factory, _n: str = fmt) -> Any:
            seen.append(_n)
            return _f(*args)

        def wrapped_accept(prefix: bytes, _a: Callable[..., Any] | None = accept, _n: str = fmt) -> Any:
            seen.append(_n)
            return _a(prefix) if _a else True

        monkeypatch.setitem(Image.OPEN, fmt, (wrapped_factory, wrapped_accept if accept else None))
    return seen


@pytest.mark.parametrize("fmt", sorted(OFF_LIST))
def test_formats_off_the_allow_list_are_never_decoded(fmt: str, opened_formats: list[str]) -> None:
    data, pillow_format = OFF_LIST[fmt]
    with Image.open(io.BytesIO(data)) as img:  # it is a real image...
        assert img.format == pillow_format
    opened_formats.clear()
    with pytest.raises(ImageError, match="not an image in an accepted format"):  # ...that we never open
        open_image(data)
    assert set(opened_formats) <= {"JPEG", "PNG", "WEBP", "BMP", "GIF"}, opened_formats


@pytest.mark.parametrize("name", sorted(NOT_IMAGES) + sorted(POLYGLOTS))
def test_documents_and_polyglots_are_refused(name: str, tmp_path: Path) -> None:
    data = NOT_IMAGES[name] if name in NOT_IMAGES else POLYGLOTS[name]
    if name in POLYGLOTS:
        with Image.open(io.BytesIO(data)) as img:  # a real image...
            img.load()
        with pytest.raises(ImageError, match="polyglot"):  # ...refused for what else it is
            open_image(data)
    else:
        with pytest.raises(ImageError):
            open_image(data)
    path = tmp_path / "picture.png"  # the name promises an image; only the bytes count
    path.write_bytes(data)
    with pytest.raises(ImageError):
        decode_for_size(path, 32)


def test_bombs_and_truncation_are_errors() -> None:
    with pytest.raises(ImageError, match=r"too large|pixels"):
        open_image(png_with_claimed_size(30_000, 30_000))
    with pytest.raises(ImageError, match="over the limit of 1000"):
        open_image(png_with_claimed_size(40, 40), max_pixels=1000)
    info = PngImagePlugin.PngInfo()
    info.add_text("bomb", "x" * (8 * 1024**2), zip=True)  # 8 MB of text deflated into a few KB
    with pytest.raises(ImageError):
        open_image(image_bytes(solid((1, 2, 3), (8, 8)), pnginfo=info))
    noise = distinct_pngs(1, size=64)[0]
    for data in (noise[: len(noise) // 2], JPEG[: len(JPEG) // 2]):
        with pytest.raises(ImageError, match="truncated"):
            open_image(data)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (Image.new("1", (8, 8), 1), (255, 255, 255)),
        (Image.new("L", (8, 8), 77), (77, 77, 77)),
        (Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("I;16", (8, 8), 65535), (255, 255, 255)),
        (Image.new("I", (8, 8), 1000), (255, 255, 255)),  # scaled by its own maximum
        (Image.new("F", (8, 8), 0.5), (127, 127, 127)),  # floats: 0..1 is black..white
        (Image.fromarray(np.array([[0.0, 2.0]] * 2, dtype=np.float32), mode="F"), (0, 0, 0)),
    ],
    ids=lambda v: getattr(v, "mode", ""),
)
def test_every_mode_converts_to_rgb(img: Image.Image, expected: tuple[int, int, int]) -> None:
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb)[0, 0].astype(int) - expected).max() <= 2
    small, original = decode_for_size(img, 16)  # an in-memory image follows the same rules
    assert small.mode == "RGB" and min(small.size) == 16 and original == img.size


def test_palette_with_transparency_is_composited_on_white() -> None:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    arr = np.asarray(open_image(image_bytes(img, transparency=0)))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[4, 4]) == (10, 200, 30)


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (2, 3000), (3, 1)])
def test_tiny_and_extreme_images_decode_to_bounded_sizes(size: tuple[int, int], tmp_path: Path) -> None:
    data = image_bytes(solid((10, 120, 240), size))
    img, original = decode_for_size(data, 256)
    assert original == size
    assert min(img.size) == 256 and max(img.size) <= 256 * 8  # never 256 x 1,280,000
    cache = PixelCache(tmp_path, 64)
    cache.add("a" * 64, data)
    h, w = cache.stored_shape("a" * 64)
    assert min(h, w) == 64 and max(h, w) <= round(64 * 4 / 3)


def test_training_copes_with_tiny_and_extreme_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    sizes = [(1, 1), (1, 5000), (5000, 1), (2, 2), (40, 40), (3, 900), (900, 3), (17, 5)]
    for cls in ("wide", "tall"):
        (root / cls).mkdir(parents=True)
        for i, size in enumerate(sizes):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            (root / cls / f"{i}.png").write_bytes(image_bytes(Image.fromarray(pixels)))
    config = lenet_config(root, tmp_path / "run", tmp_path / "cache", epochs=1, batch_size=4)
    trained = run_training(config)
    dataset = json.loads((trained.run_dir / "dataset.json").read_text())
    assert dataset["skipped"] == [] and dataset["num_images"] == 2 * len(sizes)  # all used, none refused
    assert trained.result.evaluation["val"]["count"] >= 2


# -- weights ----------------------------------------------------------------------------------------------


def safetensors_bytes(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if a file gets as far as safetensors' loader (its memory would be allocated)."""
    import safetensors

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("safetensors.safe_open was reached: the header should have been refused first")

    monkeypatch.setattr(safetensors, "safe_open", refuse)


HUGE = {"w": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 16]}}
BAD_SAFETENSORS = {
    "a huge shape": (safetensors_bytes(HUGE, bytes(16)), "declares shape"),
    "a header longer than the limit": (safetensors_bytes(b"{}", length=MAX_HEADER_BYTES + 1), "over the limit"),
    "a header past the end": (safetensors_bytes(b'{"w": 1}', length=10_000), "truncated"),
    "a header that is not JSON": (safetensors_bytes(b"\x80\x04\x95 pickle, not json"), "not JSON"),
    "a JSON list": (safetensors_bytes(b"[1, 2, 3]"), "not a JSON object"),
    "too short": (b"\x01\x02", "too short"),
    "an unknown dtype": (
        safetensors_bytes({"w": {"dtype": "OBJECT", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "unknown dtype",
    ),
    "a negative dimension": (
        safetensors_bytes({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
        "malformed shape",
    ),
    "offsets past the end": (
        safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
        "outside",
    ),
    "overlapping tensors": (
        safetensors_bytes(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            bytes(8),
        ),
        "overlaps",
    ),
    "a truncated data section": (
        safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12)),
        "truncated or padded",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_malformed_safetensors_are_refused_before_any_tensor_is_read(
    case: str, tmp_path: Path, no_tensor_reads: None
) -> None:
    data, match = BAD_SAFETENSORS[case]
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=match):
        load_state_file(path)
    with pytest.raises(WeightsError, match=match):
        build_model("lenet", 3, weights=str(path))


def test_a_truncated_real_file_is_refused(tmp_path: Path, no_tensor_reads: None) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in LeNet(3).state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        load_state_file(path)


def test_weights_that_do_not_fit_the_architecture_are_refused_from_the_header(
    tmp_path: Path, no_tensor_reads: None
) -> None:
    state = {k: v.contiguous() for k, v in LeNet(3).state_dict().items()}
    cases: dict[str, tuple[dict[str, torch.Tensor], str]] = {
        "a huge conv": ({**state, "features.0.weight": torch.zeros(600, 3, 5, 5)}, "shape of features.0.weight"),
        "integer weights": ({**state, "features.0.weight": torch.zeros(6, 3, 5, 5, dtype=torch.int64)}, "dtype"),
        "a missing tensor": ({k: v for k, v in state.items() if k != "features.3.bias"}, "missing"),
        "an extra tensor": ({**state, "evil": torch.zeros(1)}, "unexpected: evil"),
    }
    for name, (tensors, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        assert read_safetensors_header(path)  # well-formed...
        with pytest.raises(WeightsError, match=match):  # ...but not this network's, and never loaded
            build_model("lenet", 3, weights=str(path))


def test_fitting_weights_load(tmp_path: Path) -> None:
    source = LeNet(3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    built = build_model("lenet", 5, weights=str(path))
    assert torch.equal(built.model.state_dict()["features.0.weight"], source.state_dict()["features.0.weight"])


def test_a_pickle_is_never_loaded(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Boom()}, str(path))
    with pytest.raises(WeightsError, match="tensors-only"):
        load_state_file(path)
    disguised = tmp_path / "evil.safetensors"  # a pickle renamed: its "header length" is nonsense
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load_state_file(disguised)


def test_every_torch_load_says_weights_only_true() -> None:
    calls = []
    for folder in ("finetune", "app"):
        for source in sorted((REPO / folder).rglob("*.py")):
            for match in re.finditer(r"torch\.load\(([^()]*(?:\([^()]*\)[^()]*)*)\)", source.read_text()):
                calls.append((source.name, match.group(1)))
    assert calls, "expected torch.load calls to check"
    assert [c for c in calls if "weights_only=True" not in c[1]] == []
