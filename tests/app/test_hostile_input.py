"""Hostile input against the service, every file generated here: uploads (limits, archive entries that
escape or link, nested archives, user file names), images for training and for prediction (formats off the
allow-list, polyglots, bombs, truncation, every mode, tiny and extreme sizes), weights (no path is ever
accepted), dependency versions with known CVEs, and download headers.

Each refusal is a 4xx in the one error shape, and the guard checks that it wrote nothing anywhere (the data
folder, the folder around it, a canary in /tmp), stored no row, and that the service still answers."""

from __future__ import annotations

import io
import json
import re
import stat
import struct
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from app import security
from app.main import create_app
from app.settings import Settings
from finetune.dataset import load_dataset
from tests.app.conftest import (
    assert_error,
    count_rows,
    dataset_files,
    sqlite_only,
    zip_bytes,
)
from tests.app.test_models_api import TrainedRun, add_model, train_once

API = "/api/v1/datasets"
XSS = "<img src=x onerror=alert(1)>"
SMALL = dataset_files(per_class=3)
PNG = SMALL["red/0.png"]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The conftest's settings without per-user rate limits: this suite uploads and predicts a lot."""
    settings.rate_limit_uploads_per_hour = 0
    settings.rate_limit_predict_per_minute = 0
    return settings


# -- the guard: nothing written, nothing stored, still answering -----------------------------------------


class Guard:
    """Snapshots of every place a request might write to, compared after each hostile request; and the log,
    which must not show an unhandled error (a refusal is not the server's failure)."""

    def __init__(self, client: TestClient, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
        self.client = client
        self.caplog = caplog
        self.data = settings.data_dir
        self.around = settings.data_dir.parent  # the test's folder: data/ and the SQLite files live here
        self.canary = Path(tempfile.gettempdir()) / f"ft-canary-{uuid.uuid4().hex[:8]}.png"
        self.settings = settings

    def snapshot(self) -> tuple[set[str], set[str]]:
        inside = {str(p.relative_to(self.data)) for p in self.data.rglob("*")}
        around = {
            str(p.relative_to(self.around))
            for p in self.around.rglob("*")
            if not p.is_relative_to(self.data) and not p.name.startswith("service.db")
        }
        return inside, around

    def refused(
        self, request: Callable[[], Any], status: int, code: str | None, words: str = "", *, cache: bool = False
    ) -> dict[str, Any]:
        """``request()`` is answered ``status``/``code`` and leaves everything as it was (``cache``: new
        entries in the content-addressed pixel cache are allowed, for refusals that come after decoding)."""
        rows = count_rows(self.settings, "datasets")
        before = self.snapshot()
        error = assert_error(request(), status, code)
        assert words.lower() in error["message"].lower(), error
        self.nothing_written(before, cache=cache)
        assert count_rows(self.settings, "datasets") == rows
        self.still_answers()
        return error

    def nothing_written(self, before: tuple[set[str], set[str]], *, cache: bool = False) -> None:
        inside, around = before
        after_inside, after_around = self.snapshot()
        new = after_inside - inside
        if "tmp" in new and not any((self.data / "tmp").iterdir()):
            new.remove("tmp")  # the service's own temp space, created empty by the first upload
        if cache:
            new = {p for p in new if not p.startswith("cache")}
        assert new == set() and after_inside >= inside, sorted(new)
        assert after_around == around, sorted(after_around ^ around)
        assert not self.canary.exists()
        assert not (self.around / "canary.png").exists() and not (self.around.parent / "canary.png").exists()

    def no_unhandled_errors(self) -> None:
        unhandled = [r.getMessage() for r in self.caplog.records if "unhandled error" in r.getMessage()]
        assert unhandled == []

    def still_answers(self) -> None:
        self.no_unhandled_errors()
        assert self.client.get("/healthz").status_code == 200
        assert self.client.get(API).status_code == 200


@pytest.fixture
def guard(client: TestClient, settings: Settings, caplog: pytest.LogCaptureFixture) -> Iterator[Guard]:
    g = Guard(client, settings, caplog)
    yield g
    assert not g.canary.exists()
    g.no_unhandled_errors()


def archive(data: bytes, filename: str = "data.zip") -> Callable[[], dict[str, Any]]:
    return lambda: {"files": {"archive": (filename, data)}}


def files_form(files: dict[str, bytes], paths: list[str] | None = None) -> dict[str, Any]:
    parts = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(files.values())]
    return {"files": parts, "data": {"paths": paths if paths is not None else list(files)}}


def post(client: TestClient, kwargs: Callable[[], dict[str, Any]]) -> Callable[[], Any]:
    return lambda: client.post(API, **kwargs())


def upload_ok(client: TestClient, **kwargs: Any) -> dict[str, Any]:
    r = client.post(API, **kwargs)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def stored_paths(settings: Settings, dataset_id: str) -> list[str]:
    images = settings.data_dir / "datasets" / dataset_id / "images"
    return sorted(str(p.relative_to(images)) for p in images.rglob("*") if p.is_file())


# -- 1. uploads: limits -------------------------------------------------------------------------------------


def zip_entries(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return out.getvalue()


@sqlite_only
def test_every_upload_limit_is_enforced(client: TestClient, settings: Settings, guard: Guard) -> None:
    body = zip_bytes(SMALL)
    # total body size: declared, raw, and streamed without a length
    settings.max_upload_bytes = len(body) // 2
    guard.refused(post(client, archive(body)), 413, "too_large")
    guard.refused(post(client, lambda: files_form(SMALL)), 413, "too_large")
    raw = {"content": body, "headers": {"content-type": "application/zip"}}
    guard.refused(post(client, lambda: raw), 413, "too_large")
    chunked = {"content": iter([body[i : i + 999] for i in range(0, len(body), 999)])}
    guard.refused(lambda: client.post(API, headers={"content-type": "application/zip"}, **chunked), 413, "too_large")
    settings.max_upload_bytes = 10 * 1024**2
    # files in a folder upload
    settings.max_upload_files = len(SMALL) - 1
    guard.refused(post(client, lambda: files_form(SMALL)), 413, "too_many_files")
    settings.max_upload_files = 1000
    # entries in a zip
    settings.max_archive_entries = len(SMALL) - 1
    guard.refused(post(client, archive(body)), 422, "unsafe_archive", "entries")
    settings.max_archive_entries = 1000
    # decompressed bytes in total
    settings.max_extracted_bytes = sum(len(v) for v in SMALL.values()) - 1
    guard.refused(post(client, archive(body)), 422, "unsafe_archive", "in total")
    settings.max_extracted_bytes = 10 * 1024**2
    # the compression ratio: 4 MiB of zeros deflate to ~4 KiB
    bomb = zip_bytes({**SMALL, "red/bomb.png": bytes(4 * 1024**2)})
    assert len(bomb) < 64 * 1024
    guard.refused(post(client, archive(bomb)), 422, "unsafe_archive", "zip bomb")
    settings.max_compression_ratio = 1e9  # the setting is what refused it: the same zip now gets in
    ds = upload_ok(client, **archive(bomb)())
    assert [(s["path"], "not an image" in s["reason"]) for s in ds["report"]["skipped"]] == [("red/bomb.png", True)]
    guard.still_answers()


# -- 1. uploads: entries and paths ------------------------------------------------------------------------


def typed(name: str, file_type: int, create_system: int = 3) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = create_system
    info.external_attr = (file_type | 0o777) << 16
    return info


def encrypted_zip() -> bytes:
    data = bytearray(zip_bytes(SMALL))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (i := data.find(signature, start)) != -1:
            data[i + offset] |= 0x1
            start = i + 4
    return bytes(data)


ESCAPES = [
    "../../../../canary.png",
    "red/../../../../../canary.png",
    "..\\..\\..\\..\\canary.png",
    "red\\..\\..\\..\\..\\..\\canary.png",
    "C:\\canary.png",
    "C:/canary.png",
    "\\\\server\\share\\canary.png",
]


def hostile_zips(canary: Path) -> dict[str, tuple[bytes, str]]:
    """{case: (zip bytes, a word of the message)}: each a good dataset plus one hostile entry."""

    def with_entry(entry: str | zipfile.ZipInfo, data: bytes = PNG) -> bytes:
        return zip_entries([*SMALL.items(), (entry, data)])

    cases = {f"entry {name!r}": (with_entry(name), "") for name in [*ESCAPES, str(canary)]}
    cases |= {
        "a symlink": (with_entry(typed("red/passwd.png", stat.S_IFLNK), b"/etc/passwd"), "link"),
        "a symlink from a DOS zip": (with_entry(typed("red/p.png", stat.S_IFLNK, 0), str(canary).encode()), "link"),
        "a FIFO": (with_entry(typed("red/fifo.png", stat.S_IFIFO), b""), "special"),
        "a device": (with_entry(typed("red/dev.png", stat.S_IFCHR), b""), "special"),
        "an encrypted zip": (encrypted_zip(), "encrypted"),
        "a name over 255 bytes": (with_entry("red/" + "x" * 300 + ".png", PNG), "longer"),
        "a folder that cleans to nothing": (with_entry("\u202e\x01/a.png", PNG), "empty"),
    }
    with pytest.warns(UserWarning, match="Duplicate name"):
        cases["the same entry twice"] = (with_entry("red/0.png", PNG), "twice")
    return cases


@sqlite_only
def test_hostile_archive_entries_are_refused(client: TestClient, guard: Guard) -> None:
    failures = []
    for case, (data, words) in hostile_zips(guard.canary).items():
        try:
            guard.refused(post(client, archive(data)), 422, "unsafe_archive", words)
        except AssertionError as e:
            failures.append(f"{case}: {e}")
    assert failures == []


@sqlite_only
def test_hostile_folder_upload_paths_are_refused(client: TestClient, guard: Guard) -> None:
    failures = []
    names = list(SMALL)
    for bad in [*ESCAPES, str(guard.canary), "red/\x00.png", "\u202e\x01/a.png"]:
        try:
            guard.refused(post(client, lambda bad=bad: files_form(SMALL, [*names[:-1], bad])), 400, "unsafe_path")
        except AssertionError as e:
            failures.append(f"{bad!r}: {e}")
    # Without `paths`, the part's file name is the path: the same rules.
    parts = [("files", (name, data, "image/png")) for name, data in SMALL.items()]
    for bad in ("../../../../canary.png", str(guard.canary)):
        try:
            guard.refused(lambda bad=bad: client.post(API, files=[*parts, ("files", (bad, PNG))]), 400, "unsafe_path")
        except AssertionError as e:
            failures.append(f"filename {bad!r}: {e}")
    assert failures == []
    # python-multipart keeps only what follows a file name's last backslash (old browsers sent full Windows
    # paths): a loose file at the top, skipped; nothing written outside.
    ds = upload_ok(client, files=[*parts, ("files", ("C:\\..\\..\\canary.png", PNG))])
    assert [(s["path"], s["reason"]) for s in ds["report"]["skipped"]] == [("canary.png", "not inside a class folder")]
    assert not (guard.around / "canary.png").exists() and not guard.canary.exists()


def nested_archives() -> dict[str, bytes]:
    inner = zip_entries([("../../../../inner-escape.png", PNG), ("red/inner.png", PNG)])
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as tf:
        for name, kind in (("sym.png", tarfile.SYMTYPE), ("hard.png", tarfile.LNKTYPE)):
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, "/etc/passwd"
            tf.addfile(member)
        member = tarfile.TarInfo("../../../../tar-escape.png")
        member.size = len(PNG)
        tf.addfile(member, io.BytesIO(PNG))
    return {"red/inner.zip": inner, "green/photos.tar.gz": tar.getvalue(), "blue/more.tar": tar.getvalue()}


@sqlite_only
def test_nested_archives_are_skipped_never_opened(client: TestClient, settings: Settings, guard: Guard) -> None:
    ds = upload_ok(client, **archive(zip_bytes({**SMALL, **nested_archives()}))())
    skipped = {s["path"]: s["reason"] for s in ds["report"]["skipped"]}
    assert set(skipped) == {"red/inner.zip", "green/photos.tar.gz", "blue/more.tar"}
    assert all("not an image in an accepted format" in reason for reason in skipped.values())
    assert ds["num_images"] == len(SMALL)
    written = {p.name for p in settings.data_dir.parent.rglob("*")}
    assert not written & {"inner-escape.png", "tar-escape.png", "sym.png", "hard.png", "inner.png"}
    # the upload is also refused whole when it is not a zip at all (a tarball as the archive)
    guard.refused(post(client, archive(nested_archives()["green/photos.tar.gz"], "a.tar.gz")), 422, "bad_dataset")


# -- 1. uploads: user file names never become paths --------------------------------------------------------


def hostile_names() -> dict[str, bytes]:
    """Legal but hostile names: markup, control characters, bidi tricks, Windows device names, long and
    decomposed Unicode, surrounding spaces (each folder cleans up to a name of its own)."""
    pngs = iter(dataset_files(per_class=12).values())
    return {
        f"{XSS}/{XSS}.png": next(pngs),
        f"{XSS}/con.png": next(pngs),
        f"{XSS}/x\ny.png": next(pngs),
        f"{XSS}/évil\u202egnp.exe": next(pngs),
        "cafe\u0301/a.png": next(pngs),  # NFD (as macOS writes names): stored as the NFC "café"
        "cafe\u0301/b.png": next(pngs),
        " padded /c.png": next(pngs),
        " padded /d.png": next(pngs),
        f"{'long' * 40}/{'n' * 200}.png": next(pngs),
        f"{'long' * 40}/second.png": next(pngs),
        "tab\there/\t.png": next(pngs),
        "tab\there/x.png": next(pngs),
    }


CLEAN_CLASSES = sorted([XSS, "café", "padded", ("long" * 40)[:100], "tabhere"])


def check_stored_under_generated_names(
    client: TestClient, settings: Settings, ds: dict[str, Any], files: dict[str, bytes]
) -> None:
    assert ds["classes"] == CLEAN_CLASSES
    images = settings.data_dir / "datasets" / ds["id"] / "images"
    stored = stored_paths(settings, ds["id"])
    assert ".names.json" in stored
    for path in stored:
        if path != ".names.json":
            folder, leaf = path.split("/")
            assert folder in CLEAN_CLASSES and re.fullmatch(r"\d{6}", leaf), path
    report = client.get(f"{API}/{ds['id']}/report").json()
    shown = {f["path"]: f for f in report["files"]}
    assert set(shown) == {name.replace("\\", "/") for name in files}  # the report shows the user's names
    for name, f in shown.items():
        assert (images / f["stored"]).read_bytes() == files[name]
    names = json.loads((images / ".names.json").read_text())
    assert {names[f["stored"]] for f in shown.values()} == set(shown)
    # the engine reads the names file too: a job's own dataset report (the worker passes this folder) shows them
    engine = load_dataset(images).report()
    assert {f["path"] for f in engine["files"]} == set(shown) and engine["classes"] == CLEAN_CLASSES
    for leaf in {Path(n).name for n in files}:  # no user file name anywhere on disk
        assert not list(settings.data_dir.parent.rglob(glob_escape(leaf))), leaf
    # thumbnails come from the stored paths
    for urls in ds["thumbnails"].values():
        assert client.get(urls[0]).status_code == 200


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@sqlite_only
def test_zip_files_are_stored_under_generated_names(client: TestClient, settings: Settings) -> None:
    files = hostile_names()
    ds = upload_ok(client, **archive(zip_bytes(files))())
    check_stored_under_generated_names(client, settings, ds, files)


@sqlite_only
def test_folder_upload_files_are_stored_under_generated_names(client: TestClient, settings: Settings) -> None:
    files = hostile_names()
    ds = upload_ok(client, **files_form(files))
    check_stored_under_generated_names(client, settings, ds, files)


CLASHES = {
    "a zero-width joiner": (["cat", "ca\u200dt"], ["'cat'", "'ca\\u200dt'"]),
    "NFC and NFD": (["café", "cafe\u0301"], ["'café'", "'cafe\\u0301'"]),
    "a trailing space": (["dog", "dog "], ["'dog'", "'dog '"]),
    "a 100-character prefix": (["p" * 100 + "1", "p" * 100 + "2"], ["p" * 100 + "1'", "p" * 100 + "2'"]),
}


@sqlite_only
@pytest.mark.parametrize("case", list(CLASHES))
def test_folders_that_clean_up_to_one_name_are_refused_never_merged(
    client: TestClient, guard: Guard, case: str
) -> None:
    """They once became one class silently (cat, ca\u200dt, café twice, dog and 'dog ': 3 classes of 6)."""
    folders, shown = CLASHES[case]
    pngs = iter(dataset_files(per_class=4).values())
    files = {f"{folder}/{i}.png": next(pngs) for folder in [*folders, "other"] for i in range(2)}
    for form in (archive(zip_bytes(files)), lambda: files_form(files)):
        error = guard.refused(post(client, form), 422, "folder_name_clash")
        assert all(name in error["message"] for name in shown), error


@sqlite_only
def test_class_names_are_escaped_wherever_shown(client: TestClient, trained_run: TrainedRun) -> None:
    files = {f"{XSS}/{i}.png": d for i, d in enumerate(dataset_files(per_class=3, classes={"x": (1, 2, 3)}).values())}
    files |= {k.replace("red/", "plain/"): v for k, v in SMALL.items() if k.startswith("red/")}
    ds = upload_ok(client, **archive(zip_bytes(files))(), data={"name": f"{XSS} set"})
    r = client.get(f"{API}/{ds['id']}")
    assert r.headers["content-type"] == "application/json" and r.json()["classes"] == sorted([XSS, "plain"])
    page = client.get(f"/datasets/{ds['id']}")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert XSS not in page.text and "&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert "<img src=x" not in client.get("/").text
    # a model whose classes (from its dataset) carry markup
    hostile = TrainedRun(trained_run.path, [XSS, "green", "red"], trained_run.evaluation, trained_run.config)
    model_id = add_model(client, hostile, name=f"{XSS} model")
    page = client.get(f"/models/{model_id}")
    assert page.status_code == 200 and XSS not in page.text and "&lt;img src=x" in page.text


# -- 2. images for training ----------------------------------------------------------------------------------


def encoded(img: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("RGB", (8, 8), (10, 20, 30))))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def psd() -> bytes:
    header = b"8BPS" + struct.pack(">H", 1) + bytes(6) + struct.pack(">HIIHH", 3, 4, 4, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + bytes(48)


def bad_images() -> dict[str, bytes]:
    """{name: bytes} of files that must never be decoded as images."""
    rgb = Image.new("RGB", (32, 32), (200, 30, 30))
    pdf_text = PngImagePlugin.PngInfo()
    pdf_text.add_text("Comment", "%PDF-1.7 1 0 obj << >> endobj")  # a valid PNG that is a PDF as well
    noise = encoded(Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48))
    return {
        "tiff.png": encoded(rgb, "TIFF"),
        "icon.ico": encoded(rgb, "ICO"),
        "layers.psd": psd(),
        "vector.svg": b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        "doc.pdf": encoded(rgb, "PDF"),
        "page.html": b"<!DOCTYPE html><html><script>alert(1)</script></html>",
        "gifar.gif": encoded(rgb, "GIF") + zip_entries([("evil.class", b"\xca\xfe")]),
        "pdf-in-png.png": encoded(rgb, pnginfo=pdf_text),
        "empty.png": b"",
        "truncated.png": noise[: len(noise) // 2],
        "bomb.png": png_claiming(30_000, 30_000),
        "text.jpg": b"just some text",
    }


def good_images() -> dict[str, bytes]:
    """Odd but acceptable images: every mode, 1x1, extreme aspect ratios."""
    p = Image.new("P", (16, 16), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return {
        "mode-1.png": encoded(Image.new("1", (16, 16), 1)),
        "mode-l.png": encoded(Image.new("L", (16, 16), 90)),
        "mode-la.png": encoded(Image.new("LA", (16, 16), (90, 0))),
        "mode-p.png": encoded(p, transparency=0),
        "mode-rgba.png": encoded(Image.new("RGBA", (16, 16), (1, 2, 3, 4))),
        "mode-cmyk.jpg": encoded(Image.new("CMYK", (16, 16), (0, 50, 0, 0)), "JPEG"),
        "mode-i16.png": encoded(Image.new("I;16", (16, 16), 30000)),
        "one-pixel.png": encoded(Image.new("RGB", (1, 1), (5, 6, 7))),
        "strip.png": encoded(Image.new("RGB", (1, 5000), (8, 9, 10))),
        "banner.png": encoded(Image.new("RGB", (5000, 1), (11, 12, 13))),
    }


@sqlite_only
def test_training_images_off_the_allow_list_are_skipped_odd_ones_kept(client: TestClient, settings: Settings) -> None:
    bad, good = bad_images(), good_images()
    files = {**SMALL, **{f"red/{k}": v for k, v in bad.items()}, **{f"green/{k}": v for k, v in good.items()}}
    ds = upload_ok(client, **archive(zip_bytes(files))())
    skipped = {s["path"]: s["reason"] for s in ds["report"]["skipped"]}
    assert set(skipped) == {f"red/{k}" for k in bad}
    assert "polyglot" in skipped["red/gifar.gif"] and "polyglot" in skipped["red/pdf-in-png.png"]
    assert "truncated" in skipped["red/truncated.png"] and "too large" in skipped["red/bomb.png"]
    report = client.get(f"{API}/{ds['id']}/report").json()
    assert {f"green/{k}" for k in good} <= {f["path"] for f in report["files"]}
    # only the usable images were ever decoded into the pixel cache
    cached = list((settings.data_dir / "cache").rglob("*.px"))
    assert len(cached) == len({*SMALL.values(), *good.values()})


# -- 2. images for prediction --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train_once(tmp_path_factory)


@sqlite_only
def test_predict_refuses_what_is_not_an_image_and_takes_odd_images(
    client: TestClient, settings: Settings, trained_run: TrainedRun, guard: Guard
) -> None:
    model_id = add_model(client, trained_run)
    url = f"/api/v1/models/{model_id}/predict"
    failures = []
    for name, data in bad_images().items():
        for how, kwargs in (
            ("multipart", {"files": [("images", ("ok.png", PNG, "image/png")), ("images", (name, data, "image/png"))]}),
            ("raw", {"content": data, "headers": {"content-type": "application/octet-stream"}}),
        ):
            expected = (400, "no_images") if how == "raw" and not data else (422, "bad_image")
            try:
                error = guard.refused(lambda kwargs=kwargs: client.post(url, **kwargs), *expected)
                if how == "multipart":
                    assert error["details"]["index"] == 1, error
            except AssertionError as e:
                failures.append(f"{name} ({how}): {e}")
    assert failures == []
    good = good_images()
    r = client.post(url, files=[("images", (k, v, "image/png")) for k, v in good.items()])
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == len(good)
    guard.still_answers()


# -- 2. request bodies: what once answered 500 ---------------------------------------------------------------


def overlong_utf8_zip() -> bytes:
    """A name the zip flags as UTF-8 holding '/' as the overlong C0 AF: zipfile raised UnicodeDecodeError."""
    data = zip_entries([*SMALL.items(), ("red/é.png", PNG)])  # é: Python sets the UTF-8 flag
    assert data.count("é".encode()) == 2
    return data.replace("é".encode(), b"\xc0\xaf")


DEEP = "red/" + "a/" * 2000 + "x.png"  # mkdir failed: ENAMETOOLONG in a zip, RecursionError for `paths`


def multipart(boundary: str, body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


def form_body(boundary: str, field: str, filename: str, data: bytes, *, closed: bool = True) -> bytes:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n\r\n'
    return head.encode() + data + (f"\r\n--{boundary}--\r\n".encode() if closed else b"")


@sqlite_only
def test_the_former_500s_of_dataset_uploads_are_4xx(client: TestClient, guard: Guard) -> None:
    long_boundary = "b" * 10_000
    cases: list[tuple[str, Callable[[], dict[str, Any]], int, str, str]] = [
        ("overlong UTF-8 names", archive(overlong_utf8_zip()), 422, "bad_dataset", "not valid UTF-8"),
        ("a zip entry 2,000 folders deep", archive(zip_entries([*SMALL.items(), (DEEP, PNG)])), 422,
         "unsafe_archive", "2002 levels deep, more than the limit of 32"),
        ("a `paths` value 2,000 folders deep", lambda: files_form(SMALL, [*list(SMALL)[:-1], DEEP]), 400,
         "unsafe_path", "file path 'red/a/a/a"),
        ("a boundary of 10,000 characters", lambda: multipart(long_boundary, form_body(long_boundary, "archive",
         "d.zip", zip_bytes(SMALL))), 400, "bad_multipart", "boundary is 10000 characters long; at most 70"),
    ]  # fmt: skip
    failures = []
    for case, kwargs, status, code, words in cases:
        try:
            guard.refused(post(client, kwargs), status, code, words)
        except AssertionError as e:
            failures.append(f"{case}: {e}")
    assert failures == []


@sqlite_only
def test_malformed_multipart_bodies_are_refused_alike_by_uploads_and_predict(
    client: TestClient, trained_run: TrainedRun, guard: Guard
) -> None:
    """One reader serves both: an unclosed body was a 201 upload (and a refused predict); an empty boundary
    was 'no files in the upload'; a 10,000-character one was a 500 on both."""
    model_id = add_model(client, trained_run)
    endpoints = {API: ("archive", zip_bytes(SMALL)), f"/api/v1/models/{model_id}/predict": ("images", PNG)}
    failures = []
    for url, (field, data) in endpoints.items():
        cases = {
            "unclosed": (multipart("XX", form_body("XX", field, "f", data, closed=False)), "closing boundary"),
            "empty boundary": (multipart("", form_body("", field, "f", data)), "boundary= is empty"),
            "long boundary": (multipart("b" * 10_000, form_body("b" * 10_000, field, "f", data)), "at most 70"),
            "71 characters": (multipart("b" * 71, form_body("b" * 71, field, "f", data)), "at most 70"),
            "no boundary": ({"content": data, "headers": {"content-type": "multipart/form-data"}}, "no boundary"),
        }
        for case, (kwargs, words) in cases.items():
            try:
                guard.refused(lambda url=url, kwargs=kwargs: client.post(url, **kwargs), 400, "bad_multipart", words)
            except AssertionError as e:
                failures.append(f"{url} {case}: {e}")
        # the same bodies, well formed, are accepted: 70 characters is RFC 2046's maximum
        ok = client.post(url, **multipart("b" * 70, form_body("b" * 70, field, "f.zip", data)))
        assert ok.status_code in (200, 201), ok.text
    assert failures == []


def disconnect_mid_body(client: TestClient, url: str, content_type: str, first: bytes) -> list[dict[str, Any]]:
    """POST ``first`` of a body declared 1 MB long, then the client goes away: what the app sends back."""
    headers = [(k.lower().encode(), v.encode()) for k, v in client.headers.items()]
    headers += [(b"content-type", content_type.encode()), (b"content-length", b"1000000")]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": url, "raw_path": url.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {},
    }  # fmt: skip
    messages = [{"type": "http.request", "body": first, "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if len(messages) > 1 else messages[0]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def call() -> None:
        await client.app(scope, receive, send)

    assert client.portal is not None
    client.portal.call(call)
    return sent


@sqlite_only
def test_a_client_that_disconnects_mid_body_is_no_server_error(
    client: TestClient, trained_run: TrainedRun, guard: Guard
) -> None:
    model_id = add_model(client, trained_run)
    predict = f"/api/v1/models/{model_id}/predict"
    raw_upload = ("application/zip", zip_bytes(SMALL)[:100])
    form_upload = ("multipart/form-data; boundary=XX", form_body("XX", "archive", "d.zip", bytes(100), closed=False))
    cases = {predict: [("image/png", PNG[:50]), ("multipart/form-data; boundary=XX", form_body("XX", "images",
             "a.png", PNG[:50], closed=False))], API: [raw_upload, form_upload]}  # fmt: skip
    for url, bodies in cases.items():
        for content_type, first in bodies:
            before = guard.snapshot()
            sent = disconnect_mid_body(client, url, content_type, first)
            statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
            assert statuses in ([], [400]), (url, content_type, sent)
            guard.nothing_written(before)
            guard.still_answers()


@sqlite_only
def test_a_photo_with_a_page_appended_is_refused(client: TestClient, trained_run: TrainedRun, guard: Guard) -> None:
    page = b"<!DOCTYPE html><html><script>alert(document.cookie)</script></html>"
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    photo = encoded(noise, "JPEG", quality=95)
    assert len(photo) > 1024  # the page comes after the first kilobyte, the only part that was looked at
    photo += page
    ds = upload_ok(client, **archive(zip_bytes({**SMALL, "red/photo.jpg": photo}))())
    (skipped,) = ds["report"]["skipped"]
    assert skipped["path"] == "red/photo.jpg" and "HTML or SVG document (a polyglot" in skipped["reason"]
    model_id = add_model(client, trained_run)
    url = f"/api/v1/models/{model_id}/predict"
    error = guard.refused(lambda: client.post(url, files={"images": ("p.jpg", photo)}), 422, "bad_image", "polyglot")
    assert error["details"]["index"] == 0


# -- 3. weights: never a path from a client ------------------------------------------------------------------


@sqlite_only
def test_jobs_take_no_weights_path(client: TestClient, settings: Settings) -> None:
    ds = upload_ok(client, **archive(zip_bytes(SMALL))())
    for weights in ("/etc/passwd", "../model.safetensors", "file:/tmp/w.pth", "imagenet ", "IMAGENET", ""):
        body = {"dataset_id": ds["id"], "model": "lenet", "weights": weights, "epochs": 1}
        assert_error(client.post("/api/v1/jobs", json=body), 422, "invalid")
    assert count_rows(settings, "jobs") == 0
    # paths a client might slip in as other fields are the server's to decide: dropped, never used
    body = {"dataset_id": ds["id"], "model": "lenet", "weights": "none", "epochs": 1}
    job = client.post("/api/v1/jobs", json={**body, "weights_dir": "/etc", "data": "/etc", "out": "/tmp/x"}).json()
    assert "/etc" not in json.dumps(job) and "/tmp/x" not in json.dumps(job)
    spec = client.get("/openapi.json").json()
    assert spec["components"]["schemas"]["JobCreate"]["properties"]["weights"]["enum"] == ["imagenet", "none"]


# -- 4. dependency versions with known CVEs ------------------------------------------------------------------

SAFE = {"torch": "2.6.0", "pillow": "10.3.0", "python-multipart": "0.0.18", "starlette": "0.47.2"}


@pytest.mark.parametrize("row", security.KNOWN_VULNERABILITIES, ids=lambda r: f"{r.package}-{r.cve}")
def test_each_known_vulnerable_version_is_refused(row: security.KnownVulnerability) -> None:
    older = row.fixed_in.rsplit(".", 1)[0] + ".0rc1" if row.fixed_in.endswith(".0") else row.fixed_in[:-1] + "1"
    versions = {**SAFE, row.package: older}
    assert security.is_older(older, row.fixed_in)
    with pytest.raises(security.InsecureDependencyError) as caught:
        security.check_dependencies(versions.get)
    message = str(caught.value)
    assert row.package in message and older in message and row.fixed_in in message and row.cve in message
    security.check_dependencies(SAFE.get)  # the minimum versions themselves pass
    security.check_dependencies()  # and so does this environment


def test_the_app_and_the_commands_refuse_to_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    old = {"torch": "2.5.1+cu124", "pillow": "10.2.0", "python-multipart": "0.0.17", "starlette": "0.47.1"}
    monkeypatch.setattr(security, "installed_version", old.get)
    with pytest.raises(security.InsecureDependencyError) as caught:
        create_app(Settings(data_dir=tmp_path / "data"))
    for cve in ("CVE-2025-32434", "CVE-2024-28219", "CVE-2024-53981", "CVE-2025-54121"):
        assert cve in str(caught.value)
    from app import cli

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("started despite vulnerable dependencies")

    monkeypatch.setattr("app.jobs.worker.run_worker", must_not_run)
    monkeypatch.setattr("uvicorn.run", must_not_run)
    monkeypatch.setattr("app.db.migrate.upgrade", must_not_run)
    for command in ("worker", "serve"):
        assert cli.main([command]) == 2


def test_the_refusal_names_package_version_minimum_and_cve(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app import cli

    monkeypatch.setattr(security, "installed_version", {**SAFE, "torch": "2.5.1"}.get)
    assert cli.main(["worker"]) == 2
    err = capsys.readouterr().err
    assert "torch 2.5.1 is installed; 2.6.0 or later is required (CVE-2025-32434" in err


# -- 5. downloads --------------------------------------------------------------------------------------------


@sqlite_only
def test_downloads_are_attachments_named_by_the_server(client: TestClient, trained_run: TrainedRun) -> None:
    model_id = add_model(client, trained_run, name='../../evil"\r\nX-Injected: 1.html')
    r = client.get(f"/api/v1/models/{model_id}/download")
    assert r.status_code == 200
    assert r.headers["content-disposition"] == f'attachment; filename="lenet-{model_id}.zip"'
    assert r.headers["x-content-type-options"] == "nosniff" and "x-injected" not in r.headers
    ds = upload_ok(client, **archive(zip_bytes({f"{XSS}/{k}": v for k, v in SMALL.items()}))())
    url = ds["thumbnails"][next(iter(ds["thumbnails"]))][0]
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    index = url.rsplit("/", 1)[1]
    assert r.headers["content-disposition"] == f'attachment; filename="thumbnail-{ds["id"]}-{index}.jpg"'
    assert r.headers["x-content-type-options"] == "nosniff"
    r = client.get(f"{API}/{ds['id']}/thumbnails/..%2F..%2F.names.json")
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)
