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

import json
import shutil
import stat
import unicodedata
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import DatasetError, FolderNameClashError, UnsafeArchiveError

_CHUNK = 1 << 20
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


@dataclass
class StoredNames:
    """The ``rename`` hook of ``extract_zip`` (and of the service's folder uploads): maps a file's checked
    relative path to the path it is stored under, ``<cleaned folders>/<counter>``, and remembers the
    original. The counter is global, so two files never meet; two folders whose names clean up to the same
    name (``cat`` and ``ca\\u200dt``, ``dog`` and ``dog ``) would, and are a ``FolderNameClashError``."""

    max_folder_length: int = MAX_FOLDER_NAME
    originals: dict[str, str] = field(default_factory=dict)  # stored path -> original path
    _seen: set[str] = field(default_factory=set, repr=False)
    # cleaned folder path -> the original folder path it stands for
    _folders: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict, repr=False)

    def __call__(self, relative: PurePosixPath) -> PurePosixPath:
        if not relative.parts:
            raise UnsafeArchiveError("an entry has no name")
        if str(relative) in self._seen:
            raise UnsafeArchiveError(f"archive has the entry {_short(str(relative))} twice")
        self._seen.add(str(relative))
        folders = [clean_folder_name(p, self.max_folder_length) for p in relative.parts[:-1]]
        self._claim(tuple(folders), relative.parts[:-1])
        stored = PurePosixPath(*folders, f"{len(self.originals) + 1:06d}")
        self.originals[str(stored)] = str(relative)
        return stored

    def _claim(self, cleaned: tuple[str, ...], original: tuple[str, ...]) -> None:
        """Each cleaned folder stands for one original folder. Parents are claimed first, so a clash is
        found where the originals part ways: between two siblings."""
        for depth in range(1, len(cleaned) + 1):
            known = self._folders.setdefault(cleaned[:depth], original[:depth])
            if known != original[:depth]:
                raise folder_name_clash([known[-1], original[depth - 1]], cleaned[depth - 1])

    def write(self, folder: Path) -> None:
        """Keep the original names beside the files they belong to (``folder / NAMES_FILE``)."""
        (folder / NAMES_FILE).write_text(json.dumps(self.originals, ensure_ascii=False, sort_keys=True))


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


def extract_zip(
    archive: str | Path,
    dest: str | Path,
    limits: ArchiveLimits | None = None,
    *,
    display_name: str | None = None,
    rename: Rename | None = None,
) -> Path:
    """Extract the images and folders of ``archive`` into ``dest`` (which must not exist yet).

    The extraction happens in a temporary sibling folder that is renamed into place at the end, so
    ``dest`` either holds the whole archive or does not exist. Raises ``DatasetError`` for an empty or
    corrupt zip and ``UnsafeArchiveError`` for hostile entries.

    ``rename`` maps each entry's checked relative path to the relative path it is written to (e.g. a
    ``StoredNames``, which also writes its ``NAMES_FILE`` into ``dest``); without it, entries keep their
    (checked) names. Either way the result is checked again: it must stay inside ``dest``.
    """
    limits = limits or ArchiveLimits()
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(dest)
    tmp = dest.with_name(f".{dest.name}.extract-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        _extract_into(archive, tmp, limits, display_name or archive.name, rename)
        if isinstance(rename, StoredNames):
            rename.write(tmp)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _extract_into(archive: Path, root: Path, limits: ArchiveLimits, name: str, rename: Rename | None) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DatasetError(f"{name} is not a valid zip file (corrupt or not a zip)") from None
    except UnicodeDecodeError:  # the UTF-8 flag is set and a name is not UTF-8 (overlong forms among them)
        raise DatasetError(f"{name} has an entry name that is not valid UTF-8 although the zip says it is") from None
    except FileNotFoundError:
        raise DatasetError(f"{archive} does not exist") from None
    with zf:
        infos = zf.infolist()
        if not infos:
            raise DatasetError(f"{name} is an empty zip file")
        if len(infos) > limits.max_entries:
            raise UnsafeArchiveError(f"archive has {len(infos)} entries, more than the limit of {limits.max_entries}")
        plan = [(info, _check_entry(info, limits)) for info in infos]
        total = 0
        files = 0
        for info, relative in plan:
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
        if files == 0:
            raise DatasetError(f"{name} holds no files")


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
    "read_names",
    "safe_member_path",
]
