"""Reading a dataset ``.zip`` without trusting it.

Entries are written only inside the target folder: ``..``, absolute and drive paths, links and encrypted
entries reject the whole archive, and the bytes actually decompressed (not the sizes the header claims)
are counted against a cap, so a zip bomb stops early. Nested archives are just files: never opened.

``StoredNames`` goes further for files that come from someone else (the service's uploads): a file's own
name never becomes a path. Each file is stored under a generated name in its folder, folder names (class
and split names) are normalised, and the original names are kept as data in ``NAMES_FILE``, which
``finetune.dataset.load_dataset`` reads to show them in its report. Two folders whose names clean up to the
same name are refused (``FolderNameClashError``), never merged.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import stat
import struct
import unicodedata
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import DatasetError, FolderNameClashError, UnsafeArchiveError
from .tempdb import temp_db

_CHUNK = 1 << 20
_DIRECTORY_BUFFER = 1 << 16  # the central directory is read this much at a time
# Names that operating systems add to archives; they are ignored silently, never reported.
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "ehthumbs.db"})
JUNK_DIRS = frozenset({"__MACOSX"})
# {stored relative path: original relative path} of a folder whose files were renamed by ``StoredNames``.
# A dot-file: the dataset reader skips it like any hidden file, and no upload can write one (junk is skipped).
NAMES_FILE = ".names.json"
MAX_FOLDER_NAME = 100
# Real datasets nest a few folders (split/class/sub-folders); a path thousands of folders deep is an attack on
# the file system (ENAMETOOLONG, recursion in mkdir), refused with its own message before anything is written.
MAX_PATH_DEPTH = 32
MAX_PATH_BYTES = 1024
# Unix file types that may be extracted (0: no type recorded, as Windows tools and ``writestr`` leave it).
_PLAIN_TYPES = (0, stat.S_IFREG, stat.S_IFDIR)
_AES_COMPRESSION = 99  # WinZip AES encryption is announced as this compression method


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 100_000
    max_total_bytes: int = 20 * 1024**3
    max_entry_bytes: int = 512 * 1024**2
    # Images hardly compress; text-like fillers that expand 100x are bombs, not photos.
    max_ratio: float = 200.0
    max_name_length: int = 255
    max_depth: int = MAX_PATH_DEPTH
    max_path_length: int = MAX_PATH_BYTES


def is_junk(relative: PurePosixPath) -> bool:
    """OS clutter and hidden files (``__MACOSX/``, ``.DS_Store``, ``Thumbs.db``, dot-files)."""
    return any(part in JUNK_DIRS or part in JUNK_NAMES or part.startswith(".") for part in relative.parts)


def safe_member_path(
    name: str,
    max_name_length: int = 255,
    *,
    max_depth: int = MAX_PATH_DEPTH,
    max_path_length: int = MAX_PATH_BYTES,
) -> PurePosixPath:
    """The relative path an archive entry may be written to, or ``UnsafeArchiveError``: no NUL, nothing
    absolute or outside (``..``), names of at most ``max_name_length`` bytes, at most ``max_depth`` levels
    and ``max_path_length`` bytes in all."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"archive entry {_short(name)} has a NUL byte in its name")
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise UnsafeArchiveError(f"archive entry {_short(name)} has an absolute path")
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"archive entry {_short(name)} points outside the archive (..)")
    if any(len(p.encode()) > max_name_length for p in parts):
        raise UnsafeArchiveError(f"archive entry {_short(name)} has a name longer than {max_name_length} bytes")
    if len(parts) > max_depth:
        raise UnsafeArchiveError(
            f"archive entry {_short(name)} is nested {len(parts)} levels deep, more than the limit of {max_depth}"
        )
    if len(name.encode()) > max_path_length:
        raise UnsafeArchiveError(
            f"archive entry {_short(name)} has a path of {len(name.encode())} bytes, "
            f"longer than the limit of {max_path_length}"
        )
    return PurePosixPath(*parts) if parts else PurePosixPath()


def _short(name: str, keep: int = 80) -> str:
    """``name`` quoted for a message, cut when long (a 4 KB path would drown the message)."""
    return repr(name) if len(name) <= keep else f"{name[:keep]!r}..."


def clean_folder_name(part: str, max_length: int = MAX_FOLDER_NAME) -> str:
    """A user's folder name (a class or split name) as it may be stored and shown: Unicode NFC, control
    and format characters (bidi overrides among them) and path separators removed, surrounding spaces and
    leading dots (which would hide it) stripped, at most ``max_length`` characters. A name that is empty
    once cleaned (``.`` and ``..`` among them) is an ``UnsafeArchiveError``."""
    normal = unicodedata.normalize("NFC", part)
    kept = "".join(c for c in normal if c not in "/\\" and unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp"))
    cleaned = kept.strip().lstrip(".").strip()[:max_length].rstrip()
    if not cleaned:
        raise UnsafeArchiveError(f"the folder name {part[:80]!r} is empty once control characters are removed")
    return cleaned


def shown_folder(name: str) -> str:
    """A folder name quoted for a message so that names which look alike can be told apart: escaped when it
    holds invisible characters or is not in Unicode NFC (``'cafe\\u0301'`` next to ``'café'``)."""
    plain = name.isprintable() and unicodedata.normalize("NFC", name) == name
    return repr(name) if plain else ascii(name)


def folder_name_clash(names: Iterable[str], cleaned: str) -> FolderNameClashError:
    shown = sorted({shown_folder(n) for n in names})
    listed = " and ".join([", ".join(shown[:-1]), shown[-1]]) if len(shown) > 1 else shown[0]
    return FolderNameClashError(
        f"the folders {listed} would become one folder, {cleaned!r}, once their names are cleaned up "
        f"(Unicode NFC, invisible and control characters and surrounding spaces removed, at most "
        f"{MAX_FOLDER_NAME} characters): rename them so that they differ, or put their images in one folder"
    )


def check_distinct_folders(names: Iterable[str], max_length: int = MAX_FOLDER_NAME) -> None:
    """``FolderNameClashError`` when two of ``names`` (sibling folders: the classes of a dataset) clean up
    to the same name: the service stores them under their cleaned names, so it could only merge them."""
    by_cleaned: dict[str, list[str]] = {}
    for name in names:
        try:
            cleaned = clean_folder_name(name, max_length)
        except UnsafeArchiveError:
            cleaned = name  # nothing left once cleaned: nothing it could be merged with either
        by_cleaned.setdefault(cleaned, []).append(name)
    for cleaned, group in sorted(by_cleaned.items()):
        if len(set(group)) > 1:
            raise folder_name_clash(group, cleaned)


Rename = Callable[[PurePosixPath], PurePosixPath]


class StoredNames:
    """The ``rename`` hook of ``extract_zip`` (and of the service's folder uploads): maps a file's checked
    relative path to the path it is stored under, ``<cleaned folders>/<counter>``, and remembers the
    original. The counter is global, so two files never meet; two folders whose names clean up to the same
    name (``cat`` and ``ca\\u200dt``, ``dog`` and ``dog ``) would, and are a ``FolderNameClashError``.

    The names it has seen live in a temporary on-disk SQLite file, not in Python objects: an archive of a
    million files is renamed with flat memory (only the folders, a few, are kept in memory)."""

    def __init__(self, max_folder_length: int = MAX_FOLDER_NAME) -> None:
        self.max_folder_length = max_folder_length
        self.count = 0
        self._db: sqlite3.Connection | None = None
        # cleaned folder path -> the original folder path it stands for
        self._folders: dict[tuple[str, ...], tuple[str, ...]] = {}

    def __call__(self, relative: PurePosixPath) -> PurePosixPath:
        if not relative.parts:
            raise UnsafeArchiveError("an entry has no name")
        original = path_key(str(relative))
        db = self._conn()
        if db.execute("SELECT 1 FROM names WHERE original = ?", (original,)).fetchone():
            raise UnsafeArchiveError(f"archive has the entry {_short(str(relative))} twice")
        folders = [clean_folder_name(p, self.max_folder_length) for p in relative.parts[:-1]]
        self._claim(tuple(folders), relative.parts[:-1])
        stored = PurePosixPath(*folders, f"{self.count + 1:06d}")
        db.execute("INSERT INTO names VALUES (?, ?)", (path_key(str(stored)), original))
        self.count += 1
        return stored

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = temp_db()
            self._db.execute("CREATE TABLE names (stored BLOB PRIMARY KEY, original BLOB NOT NULL UNIQUE)")
        return self._db

    def _claim(self, cleaned: tuple[str, ...], original: tuple[str, ...]) -> None:
        """Each cleaned folder stands for one original folder. Parents are claimed first, so a clash is
        found where the originals part ways: between two siblings."""
        for depth in range(1, len(cleaned) + 1):
            known = self._folders.setdefault(cleaned[:depth], original[:depth])
            if known != original[:depth]:
                raise folder_name_clash([known[-1], original[depth - 1]], cleaned[depth - 1])

    def items(self) -> Iterator[tuple[str, str]]:
        """(stored path, original path), in the order of the stored paths."""
        if self._db is None:
            return
        for stored, original in self._db.execute("SELECT stored, original FROM names ORDER BY stored"):
            yield path_str(stored), path_str(original)

    @property
    def originals(self) -> dict[str, str]:
        """{stored path: original path}, in memory: for small uploads and tests (``items`` streams them)."""
        return dict(self.items())

    def write(self, folder: Path) -> None:
        """Keep the original names beside the files they belong to (``folder / NAMES_FILE``), one name a
        line (``iter_names`` reads it back a line at a time; it is JSON all the same)."""
        with open(folder / NAMES_FILE, "w", encoding="utf-8") as f:
            f.write("{")
            for i, (stored, original) in enumerate(self.items()):
                f.write(("\n" if i == 0 else ",\n") + _json_pair(stored, original))
            f.write("\n}" if self.count else "}")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _json_pair(key: str, value: str) -> str:
    return json.dumps(key, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False)


def path_key(path: str) -> bytes:
    """A path as SQLite keeps it: UTF-8 bytes (lone surrogates from undecodable file names included), so
    that SQLite orders paths exactly as Python orders the strings (by code point)."""
    return path.encode("utf-8", "surrogatepass")


def path_str(key: bytes) -> str:
    return key.decode("utf-8", "surrogatepass")


def read_names(folder: Path) -> dict[str, str]:
    """The ``NAMES_FILE`` of ``folder`` ({stored: original}), or {} when it has none (names as stored)."""
    try:
        data = json.loads((folder / NAMES_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise DatasetError(f"{folder / NAMES_FILE} is unreadable: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise DatasetError(f"{folder / NAMES_FILE} is not a mapping of stored to original names")
    return data


def iter_names(folder: Path) -> Iterator[tuple[str, str]]:
    """``read_names`` a name at a time: the files ``StoredNames.write`` writes (one name a line) are read
    line by line; any other (older) names file is read whole."""
    path = folder / NAMES_FILE
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    except OSError as e:
        raise DatasetError(f"{path} is unreadable: {e}") from None
    with f:
        try:
            first = f.readline()
            if first != "{\n":
                yield from read_names(folder).items()
                return
            for line in f:
                if line == "}":
                    return
                item = json.loads("{" + line.rstrip("\n").removesuffix(",") + "}")
                if len(item) != 1:
                    raise ValueError(f"not one name a line: {line[:80]!r}")
                ((stored, original),) = item.items()
                if not isinstance(original, str):
                    raise DatasetError(f"{path} is not a mapping of stored to original names")
                yield stored, original
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path} is unreadable: {e}") from None
        raise DatasetError(f"{path} is unreadable: it ends early")


def extract_zip(
    archive: str | Path,
    dest: str | Path,
    limits: ArchiveLimits | None = None,
    *,
    display_name: str | None = None,
    rename: Rename | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Extract the images and folders of ``archive`` into ``dest`` (which must not exist yet).

    The extraction happens in a temporary sibling folder that is renamed into place at the end, so
    ``dest`` either holds the whole archive or does not exist. Raises ``DatasetError`` for an empty or
    corrupt zip and ``UnsafeArchiveError`` for hostile entries.

    ``rename`` maps each entry's checked relative path to the relative path it is written to (e.g. a
    ``StoredNames``, which also writes its ``NAMES_FILE`` into ``dest``); without it, entries keep their
    (checked) names. Either way the result is checked again: it must stay inside ``dest``. ``progress``
    is called with (files extracted, files in the archive) every few hundred files.
    """
    limits = limits or ArchiveLimits()
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(dest)
    tmp = dest.with_name(f".{dest.name}.extract-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        _extract_into(archive, tmp, limits, display_name or archive.name, rename, progress)
        if isinstance(rename, StoredNames):
            rename.write(tmp)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _extract_into(
    archive: Path,
    root: Path,
    limits: ArchiveLimits,
    name: str,
    rename: Rename | None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    try:
        zf = _LazyZipFile(archive)
    except zipfile.BadZipFile:
        raise DatasetError(f"{name} is not a valid zip file (corrupt or not a zip)") from None
    except FileNotFoundError:
        raise DatasetError(f"{archive} does not exist") from None
    with zf:
        # First pass: every entry is read and checked before anything is written (the entries are not kept:
        # the second pass reads them again, so a zip of a million files is extracted with flat memory).
        entries = 0
        expected = 0
        refusal: Exception | None = None  # the first entry refused, raised once the whole directory is read
        try:
            for info in zf.iter_infos():
                entries += 1
                if refusal is not None:
                    continue
                try:
                    relative = _check_entry(info, limits)
                except Exception as e:
                    refusal = e
                    continue
                if relative is not None and not info.is_dir():
                    expected += 1
        except zipfile.BadZipFile:
            raise DatasetError(f"{name} is not a valid zip file (corrupt or not a zip)") from None
        except NotImplementedError as e:  # an entry needs a newer zip format than Python's zipfile reads
            raise DatasetError(
                f"{name} uses a {str(e).replace('zip file', 'zip format')} feature this server cannot read: "
                "zip it again with a standard tool"
            ) from None
        except UnicodeDecodeError:  # the UTF-8 flag is set and a name is not UTF-8 (overlong forms among them)
            raise DatasetError(
                f"{name} has an entry name that is not valid UTF-8 although the zip says it is"
            ) from None
        if not entries:
            raise DatasetError(f"{name} is an empty zip file")
        if entries > limits.max_entries:
            raise UnsafeArchiveError(f"archive has {entries} entries, more than the limit of {limits.max_entries}")
        if refusal is not None:
            raise refusal
        total = 0
        files = 0
        for info in zf.iter_infos():
            relative = _check_entry(info, limits)
            if relative is None or info.is_dir():
                continue
            if rename is not None:
                stored = rename(relative)
                if safe_member_path(str(stored)) != stored or not stored.parts or is_junk(stored):
                    raise UnsafeArchiveError(f"archive entry {info.filename!r} was renamed to an unusable path")
                relative = stored
            target = root.joinpath(*relative.parts)
            # Belt and braces: the resolved target must stay inside root.
            if not target.resolve().is_relative_to(root.resolve()):
                raise UnsafeArchiveError(f"archive entry {info.filename!r} points outside the archive")
            target.parent.mkdir(parents=True, exist_ok=True)
            total += _copy_entry(zf, info, target, limits, already=total)
            files += 1
            if progress is not None and (files % 256 == 0 or files == expected):
                progress(files, expected)
        if files == 0:
            raise DatasetError(f"{name} holds no files")


class _LazyZipFile(zipfile.ZipFile):
    """A ``ZipFile`` for reading that does not load its central directory into a list of ``ZipInfo`` (a
    few hundred bytes an entry, all at once): ``iter_infos`` reads it again, an entry at a time, each time it
    is called. Entries are opened with ``open(info)``; lookups by name are not available. Parsing follows
    ``zipfile.ZipFile._RealGetContents``."""

    def _RealGetContents(self) -> None:  # the name zipfile calls
        fp = self.fp
        assert fp is not None
        try:
            endrec = zipfile._EndRecData(fp)  # type: ignore[attr-defined]
        except OSError:
            raise zipfile.BadZipFile("File is not a zip file") from None
        if not endrec:
            raise zipfile.BadZipFile("File is not a zip file")
        size_cd = endrec[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
        offset_cd = endrec[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
        self._comment = endrec[zipfile._ECD_COMMENT]  # type: ignore[attr-defined]
        concat = endrec[zipfile._ECD_LOCATION] - size_cd - offset_cd  # type: ignore[attr-defined]
        if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
            concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
        self.start_dir = offset_cd + concat
        if self.start_dir < 0:
            raise zipfile.BadZipFile("Bad offset for central directory")
        self._size_cd = size_cd
        self._concat = concat

    def iter_infos(self) -> Iterator[zipfile.ZipInfo]:
        """Every entry of the central directory, in order (``BadZipFile`` where it is corrupt)."""
        assert isinstance(self.filename, str)
        size_cd, concat = self._size_cd, self._concat
        with open(self.filename, "rb") as raw:
            raw.seek(self.start_dir)
            fp = io.BufferedReader(_Limited(raw, size_cd), buffer_size=_DIRECTORY_BUFFER)
            total = 0
            while total < size_cd:
                header = fp.read(zipfile.sizeCentralDir)  # type: ignore[attr-defined]
                if len(header) != zipfile.sizeCentralDir:  # type: ignore[attr-defined]
                    raise zipfile.BadZipFile("Truncated central directory")
                centdir = struct.unpack(zipfile.structCentralDir, header)  # type: ignore[attr-defined]
                if centdir[zipfile._CD_SIGNATURE] != zipfile.stringCentralDir:  # type: ignore[attr-defined]
                    raise zipfile.BadZipFile("Bad magic number for central directory")
                name_length = centdir[zipfile._CD_FILENAME_LENGTH]  # type: ignore[attr-defined]
                extra_length = centdir[zipfile._CD_EXTRA_FIELD_LENGTH]  # type: ignore[attr-defined]
                comment_length = centdir[zipfile._CD_COMMENT_LENGTH]  # type: ignore[attr-defined]
                raw_name = fp.read(name_length)
                flags = centdir[zipfile._CD_FLAG_BITS]  # type: ignore[attr-defined]
                if flags & zipfile._MASK_UTF_FILENAME:  # type: ignore[attr-defined]
                    filename = raw_name.decode("utf-8")
                else:
                    filename = raw_name.decode(getattr(self, "metadata_encoding", None) or "cp437")
                x = zipfile.ZipInfo(filename)
                x.extra = fp.read(extra_length)
                x.comment = fp.read(comment_length)
                x.header_offset = centdir[zipfile._CD_LOCAL_HEADER_OFFSET]  # type: ignore[attr-defined]
                (
                    x.create_version,
                    x.create_system,
                    x.extract_version,
                    x.reserved,
                    x.flag_bits,
                    x.compress_type,
                    t,
                    d,
                    x.CRC,
                    x.compress_size,
                    x.file_size,
                ) = centdir[1:12]
                if x.extract_version > zipfile.MAX_EXTRACT_VERSION:
                    raise NotImplementedError(f"zip file version {x.extract_version / 10:.1f}")
                x.volume, x.internal_attr, x.external_attr = centdir[15:18]
                x._raw_time = t  # type: ignore[attr-defined]
                x.date_time = ((d >> 9) + 1980, (d >> 5) & 0xF, d & 0x1F, t >> 11, (t >> 5) & 0x3F, (t & 0x1F) * 2)
                x._decodeExtra()  # type: ignore[attr-defined]
                x.header_offset = x.header_offset + concat
                total += zipfile.sizeCentralDir + name_length + extra_length + comment_length  # type: ignore[attr-defined]
                yield x


class _Limited(io.RawIOBase):
    """The next ``limit`` bytes of ``raw`` (the central directory: reading past it is reading nothing)."""

    def __init__(self, raw: io.BufferedReader, limit: int) -> None:
        self._raw = raw
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._left)
        if n <= 0:
            return 0
        data = self._raw.read(n)
        buffer[: len(data)] = data
        self._left -= len(data)
        return len(data)


def _check_entry(info: zipfile.ZipInfo, limits: ArchiveLimits) -> PurePosixPath | None:
    """Validate one entry; return its relative path, or None for OS junk that is skipped silently."""
    relative = safe_member_path(
        info.filename, limits.max_name_length, max_depth=limits.max_depth, max_path_length=limits.max_path_length
    )
    # Bit 0: encrypted; bit 6: strong encryption; method 99: WinZip AES.
    if info.flag_bits & 0x41 or info.compress_type == _AES_COMPRESSION:
        raise UnsafeArchiveError(f"archive entry {info.filename!r} is encrypted")
    # Unix file type bits, whatever system the zip says made it (the bits are what unzip tools act on);
    # zips written without them (Python's ``ZipFile.writestr`` gives 0o600) are plain files.
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type not in _PLAIN_TYPES:
        kind = "symbolic link" if file_type == stat.S_IFLNK else "device, FIFO or socket"
        raise UnsafeArchiveError(f"archive entry {info.filename!r} is a link or special file ({kind}): refused")
    if not relative.parts or is_junk(relative):
        return None
    if info.file_size > limits.max_entry_bytes:
        raise UnsafeArchiveError(
            f"archive entry {info.filename!r} is {info.file_size} bytes, over the limit of {limits.max_entry_bytes}"
        )
    return relative


def _copy_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limits: ArchiveLimits, already: int) -> int:
    """Decompress one entry, counting real bytes against the caps; returns the bytes written."""
    written = 0
    entry_cap = min(limits.max_entry_bytes, int(max(info.compress_size, 1) * limits.max_ratio) + _CHUNK)
    try:
        with zf.open(info) as src, open(target, "xb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > entry_cap:
                    raise UnsafeArchiveError(
                        f"archive entry {info.filename!r} expands beyond {entry_cap} bytes "
                        f"(compression ratio or size limit): refusing a possible zip bomb"
                    )
                if already + written > limits.max_total_bytes:
                    raise UnsafeArchiveError(
                        f"archive expands beyond the limit of {limits.max_total_bytes} bytes in total"
                    )
                dst.write(chunk)
    except FileExistsError:
        raise UnsafeArchiveError(f"archive has the entry {info.filename!r} twice") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, UnicodeDecodeError) as e:
        raise DatasetError(f"archive entry {info.filename!r} is corrupt: {e}") from None
    return written


__all__ = [
    "NAMES_FILE",
    "ArchiveLimits",
    "StoredNames",
    "check_distinct_folders",
    "clean_folder_name",
    "extract_zip",
    "is_junk",
    "iter_names",
    "path_key",
    "path_str",
    "read_names",
    "safe_member_path",
]
