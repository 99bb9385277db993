"""Refusing to start on dependency versions with known vulnerabilities in the paths this service uses.

Each row names a package, the first version without the vulnerability, the CVE and what it allows. The API
(``create_app``) and the ``serve`` and ``worker`` commands call ``check_dependencies`` before doing
anything else; a version below a row's minimum stops them with an ``InsecureDependencyError`` that names
the package, the installed version, the minimum safe version and the CVE.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class KnownVulnerability:
    package: str  # the distribution name, as pip knows it
    fixed_in: str  # the first safe version
    cve: str
    summary: str


KNOWN_VULNERABILITIES: tuple[KnownVulnerability, ...] = (
    KnownVulnerability(
        "torch", "2.6.0", "CVE-2025-32434", "torch.load(weights_only=True) can still run code from a crafted file"
    ),
    KnownVulnerability("pillow", "10.3.0", "CVE-2024-28219", "buffer overflow in _imagingcms"),
    KnownVulnerability("pillow", "10.2.0", "CVE-2023-50447", "arbitrary code execution through PIL.ImageMath.eval"),
    KnownVulnerability(
        "python-multipart",
        "0.0.18",
        "CVE-2024-53981",
        "denial of service: junk around boundaries is parsed byte by byte",
    ),
    KnownVulnerability(
        "python-multipart", "0.0.7", "CVE-2024-24762", "denial of service: regular expression on the Content-Type"
    ),
    KnownVulnerability(
        "starlette", "0.47.2", "CVE-2025-54121", "denial of service: large multipart files block the event loop"
    ),
    KnownVulnerability(
        "starlette", "0.40.0", "CVE-2024-47874", "denial of service: multipart form fields without a size limit"
    ),
)


class InsecureDependencyError(RuntimeError):
    """An installed package is older than the first version without a known vulnerability."""


def installed_version(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def vulnerable_dependencies(
    version_of: Callable[[str], str | None] | None = None,
) -> list[tuple[KnownVulnerability, str]]:
    """(row, installed version) for every known vulnerability the installed packages have."""
    version_of = version_of or installed_version
    found: list[tuple[KnownVulnerability, str]] = []
    for row in KNOWN_VULNERABILITIES:
        installed = version_of(row.package)
        if installed is None:
            continue  # not installed: nothing of it runs
        if is_older(installed, row.fixed_in):
            found.append((row, installed))
    return found


_RELEASE = re.compile(r"v?(\d+(?:\.\d+)*)(.*)", re.IGNORECASE)
_PRE_RELEASE = re.compile(r"[.\-_]?(a|b|c|rc|alpha|beta|pre|preview|dev)", re.IGNORECASE)


def is_older(installed: str, minimum: str) -> bool:
    """Whether version ``installed`` comes before the release ``minimum`` (PEP 440 order for the cases that
    matter here: ``2.5.1+cu124`` < ``2.6.0``; ``2.6.0rc1`` and ``2.6.0.dev20241112`` < ``2.6.0`` <=
    ``2.6.0+cpu``, ``2.6.0.post1``). A version that cannot be read counts as older: it is not known safe."""
    match = _RELEASE.fullmatch(installed.strip())
    if match is None:
        return True
    have = [int(x) for x in match.group(1).split(".")]
    need = [int(x) for x in minimum.split(".")]
    width = max(len(have), len(need))
    have += [0] * (width - len(have))
    need += [0] * (width - len(need))
    if have != need:
        return have < need
    return _PRE_RELEASE.match(match.group(2)) is not None


def check_dependencies(version_of: Callable[[str], str | None] | None = None) -> None:
    """Raise ``InsecureDependencyError`` naming every vulnerable package (nothing when all are safe)."""
    found = vulnerable_dependencies(version_of or installed_version)
    if not found:
        return
    lines = [
        f"{row.package} {installed} is installed; {row.fixed_in} or later is required ({row.cve}: {row.summary})"
        for row, installed in found
    ]
    packages = sorted({row.package for row, _ in found})
    raise InsecureDependencyError(
        "refusing to start with dependencies that have known vulnerabilities:\n  "
        + "\n  ".join(lines)
        + f"\nUpgrade them (pip install --upgrade {' '.join(packages)}) and start again."
    )
