"""Zip extraction without trusting the archive: hostile entries and bombs are refused, atomically."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from finetune.archive import ArchiveLimits, extract_zip, safe_member_path
from finetune.errors import DatasetError, UnsafeArchiveError

from .helpers import distinct_pngs, set_encrypted_flag, symlink_entry, write_zip


def _extract_fails(archive: Path, dest: Path, error: type[Exception], match: str, **limits: object) -> None:
    with pytest.raises(error, match=match):
        extract_zip(archive, dest, ArchiveLimits(**limits) if limits else None)  # type: ignore[arg-type]
    # Nothing half-extracted is left behind: neither the target nor the temporary folder.
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}")] == []
    assert not (dest.parent.parent / "evil.png").exists()


def test_extracts_a_good_zip(tmp_path: Path) -> None:
    a, b = distinct_pngs(2)
    archive = write_zip(tmp_path / "ok.zip", [("red/a.png", a), ("blue/sub/b.png", b), ("blue/", b"")])
    out = extract_zip(archive, tmp_path / "out")
    assert (out / "red" / "a.png").read_bytes() == a
    assert (out / "blue" / "sub" / "b.png").read_bytes() == b


def test_os_junk_is_not_extracted(tmp_path: Path) -> None:
    (a,) = distinct_pngs(1)
    archive = write_zip(
        tmp_path / "junk.zip",
        [
            ("red/a.png", a),
            ("__MACOSX/red/._a.png", b"resource fork"),
            ("red/.DS_Store", b"finder"),
            ("red/Thumbs.db", b"explorer"),
            ("red/.hidden.png", a),
        ],
    )
    out = extract_zip(archive, tmp_path / "out")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["red/a.png"]


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../evil.png", r"outside the archive \(\.\.\)"),
        ("red/../../evil.png", r"outside the archive \(\.\.\)"),
        ("..\\evil.png", r"outside the archive \(\.\.\)"),
        ("/tmp/evil.png", "absolute path"),
        ("C:/evil.png", "absolute path"),
        ("red/" + "x" * 300 + ".png", "longer than 255"),
    ],
)
def test_path_escapes_reject_the_whole_archive(tmp_path: Path, name: str, match: str) -> None:
    (a,) = distinct_pngs(1)
    archive = write_zip(tmp_path / "evil.zip", [("red/ok.png", a), (name, a)])
    _extract_fails(archive, tmp_path / "work" / "out", UnsafeArchiveError, match)


def test_symlink_entry_is_refused(tmp_path: Path) -> None:
    (a,) = distinct_pngs(1)
    archive = write_zip(tmp_path / "link.zip", [("red/a.png", a), (symlink_entry("red/passwd.png"), b"/etc/passwd")])
    _extract_fails(archive, tmp_path / "out", UnsafeArchiveError, "link or special file")


def test_encrypted_entry_is_refused(tmp_path: Path) -> None:
    (a,) = distinct_pngs(1)
    archive = write_zip(tmp_path / "enc.zip", [("red/a.png", a)])
    set_encrypted_flag(archive)
    with zipfile.ZipFile(archive) as zf:
        assert zf.infolist()[0].flag_bits & 0x1
    _extract_fails(archive, tmp_path / "out", UnsafeArchiveError, "encrypted")


def test_empty_and_corrupt_zips(tmp_path: Path) -> None:
    empty = write_zip(tmp_path / "empty.zip", [])
    _extract_fails(empty, tmp_path / "o1", DatasetError, "empty zip")
    only_dirs = write_zip(tmp_path / "dirs.zip", [("red/", b""), ("blue/", b"")])
    _extract_fails(only_dirs, tmp_path / "o2", DatasetError, "holds no files")
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"this is not a zip file at all" * 10)
    _extract_fails(corrupt, tmp_path / "o3", DatasetError, "not a valid zip")
    _extract_fails(tmp_path / "missing.zip", tmp_path / "o4", DatasetError, "does not exist")


def test_damaged_entry_data_is_a_dataset_error(tmp_path: Path) -> None:
    (a,) = distinct_pngs(1, size=64)
    archive = write_zip(tmp_path / "bad.zip", [("red/a.png", a)])
    data = bytearray(archive.read_bytes())
    start = data.find(b"red/a.png") + len("red/a.png")  # the deflated data follows the local header
    data[start + 10 : start + 40] = bytes(30)
    archive.write_bytes(bytes(data))
    _extract_fails(archive, tmp_path / "out", DatasetError, "corrupt")


def test_zip_bomb_is_stopped_by_the_compression_ratio(tmp_path: Path) -> None:
    # 4 MiB of zeros deflate to a few KiB: far beyond any image's compression ratio.
    archive = write_zip(tmp_path / "bomb.zip", [("red/a.png", bytes(4 * 1024**2))])
    assert archive.stat().st_size < 20_000
    _extract_fails(archive, tmp_path / "out", UnsafeArchiveError, "zip bomb")


def test_total_decompressed_bytes_are_capped(tmp_path: Path) -> None:
    pngs = distinct_pngs(6, size=40)  # noise: each ~5 KB, barely compressible, so no ratio alarm
    archive = write_zip(tmp_path / "big.zip", [(f"red/{i}.png", d) for i, d in enumerate(pngs)])
    limit = sum(len(d) for d in pngs) - 1
    _extract_fails(archive, tmp_path / "out", UnsafeArchiveError, "in total", max_total_bytes=limit)
    assert extract_zip(archive, tmp_path / "ok", ArchiveLimits(max_total_bytes=limit + 1)).is_dir()


def test_entry_size_and_count_limits(tmp_path: Path) -> None:
    pngs = distinct_pngs(3, size=40)
    archive = write_zip(tmp_path / "a.zip", [(f"red/{i}.png", d) for i, d in enumerate(pngs)])
    _extract_fails(archive, tmp_path / "o1", UnsafeArchiveError, "over the limit", max_entry_bytes=1000)
    _extract_fails(archive, tmp_path / "o2", UnsafeArchiveError, "more than the limit of 2", max_entries=2)


def test_duplicate_entry_names_are_refused(tmp_path: Path) -> None:
    a, b = distinct_pngs(2)
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = write_zip(tmp_path / "dup.zip", [("red/a.png", a), ("red/a.png", b)])
    _extract_fails(archive, tmp_path / "out", UnsafeArchiveError, "twice")


def test_destination_must_not_exist(tmp_path: Path) -> None:
    (a,) = distinct_pngs(1)
    archive = write_zip(tmp_path / "ok.zip", [("red/a.png", a)])
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        extract_zip(archive, tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a/b.png", "a/b.png"), ("./a//b.png", "a/b.png"), ("a\\b.png", "a/b.png"), ("a/", "a")],
)
def test_safe_member_path_normalises(name: str, expected: str) -> None:
    assert str(safe_member_path(name)) == expected


def test_safe_member_path_refuses_nul() -> None:
    with pytest.raises(UnsafeArchiveError, match="NUL"):
        safe_member_path("a\x00.png")


def test_extracted_files_are_regular_files(tmp_path: Path) -> None:
    (a,) = distinct_pngs(1)
    info = zipfile.ZipInfo("red/a.png")
    info.create_system = 3
    info.external_attr = 0o100755 << 16  # a regular file with odd permissions is fine
    archive = write_zip(tmp_path / "perm.zip", [(info, a)])
    out = extract_zip(archive, tmp_path / "out")
    target = out / "red" / "a.png"
    assert target.is_file() and not target.is_symlink()
    assert target.stat().st_mode & 0o111 == 0  # permission bits are not copied from the zip


def test_paths_too_deep_or_too_long_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A 2,000-folder entry once crashed mkdir (file name too long; recursion in pathlib)."""
    (a,) = distinct_pngs(1)
    deep = write_zip(tmp_path / "deep.zip", [("red/ok.png", a), ("a/" * 2000 + "x.png", a)])
    _extract_fails(deep, tmp_path / "o1", UnsafeArchiveError, "2001 levels deep, more than the limit of 32")
    long = write_zip(tmp_path / "long.zip", [("red/ok.png", a), ("/".join(["n" * 200] * 6) + ".png", a)])
    _extract_fails(long, tmp_path / "o2", UnsafeArchiveError, "longer than the limit of 1024")
    # the limits are the archive's to set, and a path within them is extracted as usual
    nested = write_zip(tmp_path / "nested.zip", [("red/" + "d/" * 30 + "x.png", a)])
    _extract_fails(nested, tmp_path / "o3", UnsafeArchiveError, "levels deep", max_depth=8)
    assert (extract_zip(nested, tmp_path / "ok") / "red").is_dir()


def test_entry_names_that_are_not_utf8_despite_the_flag_are_a_dataset_error(tmp_path: Path) -> None:
    """Overlong UTF-8 ('/' as C0 AF) in a name the zip flags as UTF-8: zipfile raises UnicodeDecodeError."""
    (a,) = distinct_pngs(1)
    archive = write_zip(tmp_path / "utf8.zip", [("red/ok.png", a), ("red/é.png", a)])  # é sets the UTF-8 flag
    data = archive.read_bytes()
    assert data.count("é".encode()) == 2  # the local and the central header
    archive.write_bytes(data.replace("é".encode(), b"\xc0\xaf"))
    _extract_fails(archive, tmp_path / "out", DatasetError, "not valid UTF-8")


def test_a_zip_needing_a_newer_format_version_is_a_dataset_error(tmp_path: Path) -> None:
    """An entry whose "version needed to extract" is past what zipfile reads (9.9 > 6.3): refused with the
    reason, not a server error."""
    (a,) = distinct_pngs(1)
    archive = write_zip(tmp_path / "new.zip", [("red/a.png", a), ("blue/a.png", a)])
    data = bytearray(archive.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 6 : central + 8] = (99).to_bytes(2, "little")
    archive.write_bytes(bytes(data))
    _extract_fails(archive, tmp_path / "out", DatasetError, "zip format version 9.9")
