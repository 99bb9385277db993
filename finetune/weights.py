"""Pretrained weights: torchvision's weights API and torch's cache, strictly offline unless asked.

``imagenet`` means the architecture's DEFAULT torchvision weights. Their file lives in torch's standard
cache (``$TORCH_HOME/hub/checkpoints``, or a folder the caller names) under torchvision's file name, whose
``-<hex>`` suffix is a prefix of the file's SHA-256. Nothing here downloads unless ``fetch`` is called:
a missing file is an immediate ``WeightsNotCachedError`` that names the file, its folder, its URL and the
commands that fetch or import it.

``load_state_file`` reads user-supplied weights: ``.safetensors`` always, ``.pth`` only as tensors
(``weights_only=True``), never an arbitrary pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import WeightsError, WeightsNotCachedError

PRETRAINED_ARCHITECTURES = ("alexnet", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
_ACCEPTED_SUFFIX = ".accepted.json"


def default_cache_dir() -> Path:
    """torch's standard folder for downloaded checkpoints (honours ``TORCH_HOME``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights(arch: str) -> Any:
    """The torchvision weights enum member used for ``weights="imagenet"`` (the DEFAULT entry)."""
    from torchvision.models import get_model_weights

    if arch not in PRETRAINED_ARCHITECTURES:
        raise WeightsError(
            f"{arch!r} has no ImageNet weights; architectures with them: {', '.join(PRETRAINED_ARCHITECTURES)}"
        )
    return get_model_weights(arch).DEFAULT


@dataclass(frozen=True)
class WeightsFile:
    arch: str
    weights: str  # the enum's name, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    url: str
    filename: str
    path: Path
    hash_prefix: str

    def missing_message(self) -> str:
        return (
            f"ImageNet weights for {self.arch} ({self.weights}) are not cached: expected the file "
            f"{self.filename} in {self.path.parent} (from {self.url}). This machine will not download it "
            f"implicitly. Run `finetune weights fetch {self.arch}` where the internet is reachable, or "
            f"download the file elsewhere and run `finetune weights import {self.arch} FILE`."
        )


def weights_file(arch: str, cache_dir: str | Path | None = None) -> WeightsFile:
    w = imagenet_weights(arch)
    filename = w.url.rsplit("/", 1)[-1]
    match = _HASH_IN_NAME.search(filename)
    directory = Path(cache_dir) if cache_dir else default_cache_dir()
    return WeightsFile(arch, str(w), w.url, filename, directory / filename, match.group(1) if match else "")


@dataclass(frozen=True)
class WeightsStatus:
    arch: str
    weights: str
    filename: str
    path: str
    url: str
    present: bool
    size: int | None
    verified: bool | None  # None: not checked (file absent, or verify=False)
    accepted_unverified: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# (path, size, mtime_ns) -> sha256: hashing a 230 MB file on every status call would be wasteful.
_hash_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _hash_memo[key] = h.hexdigest()
    return _hash_memo[key]


def status(arch: str, cache_dir: str | Path | None = None, *, verify: bool = True) -> WeightsStatus:
    wf = weights_file(arch, cache_dir)
    present = wf.path.is_file()
    size = wf.path.stat().st_size if present else None
    verified: bool | None = None
    accepted = False
    if present and verify:
        digest = file_sha256(wf.path)
        verified = digest.startswith(wf.hash_prefix)
        accepted = not verified and _accepted_digest(wf.path) == digest
    return WeightsStatus(arch, wf.weights, wf.filename, str(wf.path), wf.url, present, size, verified, accepted)


def status_all(cache_dir: str | Path | None = None, *, verify: bool = True) -> list[WeightsStatus]:
    return [status(a, cache_dir, verify=verify) for a in PRETRAINED_ARCHITECTURES]


def cached_imagenet_path(arch: str, cache_dir: str | Path | None = None) -> Path:
    """The verified cached file for ``arch``; raises at once when it is absent or fails its hash."""
    wf = weights_file(arch, cache_dir)
    if not wf.path.is_file():
        raise WeightsNotCachedError(wf.missing_message())
    digest = file_sha256(wf.path)
    if not digest.startswith(wf.hash_prefix) and _accepted_digest(wf.path) != digest:
        raise WeightsError(
            f"{wf.path} does not match torchvision's published hash (its SHA-256 starts with {digest[:8]}, "
            f"expected {wf.hash_prefix}): the file is corrupt or not {wf.weights}. Delete it and fetch it "
            f"again, or import it with `finetune weights import {arch} FILE --accept-unverified` if you "
            "trust it."
        )
    return wf.path


def fetch(arch: str, cache_dir: str | Path | None = None, *, url: str | None = None, progress: bool = True) -> Path:
    """Download the ImageNet weights into the cache (checks the hash prefix; atomic)."""
    import torch.hub

    wf = weights_file(arch, cache_dir)
    wf.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = wf.path.with_name(f".{wf.filename}.{uuid.uuid4().hex[:8]}.part")
    try:
        torch.hub.download_url_to_file(url or wf.url, str(tmp), hash_prefix=wf.hash_prefix or None, progress=progress)
        _fsync_file(tmp)
        os.replace(tmp, wf.path)
    except RuntimeError as e:  # torch.hub's hash mismatch
        raise WeightsError(f"download of {wf.filename} failed its hash check: {e}") from None
    except OSError as e:
        raise WeightsError(
            f"could not download {url or wf.url}: {e}. On a machine without internet access, download the "
            f"file elsewhere and run `finetune weights import {arch} FILE`."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return wf.path


def import_file(
    arch: str, source: str | Path, cache_dir: str | Path | None = None, *, accept_unverified: bool = False
) -> Path:
    """Copy ``source`` into the cache under torchvision's file name after checking its hash prefix
    (and that its tensors fit the architecture). A mismatch is refused unless ``accept_unverified``."""
    source = Path(source)
    if not source.is_file():
        raise WeightsError(f"{source} does not exist or is not a file")
    wf = weights_file(arch, cache_dir)
    digest = file_sha256(source)
    verified = digest.startswith(wf.hash_prefix)
    if not verified and not accept_unverified:
        raise WeightsError(
            f"{source} does not match torchvision's published hash for {wf.weights} (SHA-256 starts with "
            f"{digest[:8]}, expected {wf.hash_prefix}). Pass --accept-unverified to import it anyway."
        )
    from .models import check_backbone_keys  # torch-heavy: imported only when needed

    check_backbone_keys(arch, load_state_file(source), num_classes=1000)
    wf.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = wf.path.with_name(f".{wf.filename}.{uuid.uuid4().hex[:8]}.part")
    try:
        shutil.copyfile(source, tmp)
        _fsync_file(tmp)
        os.replace(tmp, wf.path)
    finally:
        tmp.unlink(missing_ok=True)
    marker = wf.path.with_name(wf.filename + _ACCEPTED_SUFFIX)
    if verified:
        marker.unlink(missing_ok=True)
    else:
        marker.write_text(json.dumps({"sha256": digest, "source": str(source)}))
    return wf.path


def load_state_file(path: str | Path) -> dict[str, Any]:
    """Tensors from a ``.safetensors`` file, or a tensors-only ``.pth`` (never an arbitrary pickle)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path.name} is not a valid safetensors file: {e}") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # weights_only refuses anything but tensors and plain containers; torch's own message
            # suggests loading the file anyway, which is exactly what we must never do with user files.
            raise WeightsError(
                f"{path.name} is not a tensors-only torch file (it holds pickled Python objects, or is not a "
                "torch file at all) and is refused: it was read with weights_only=True. Save the state dict as "
                ".safetensors instead."
            ) from None
        except Exception as e:
            raise WeightsError(f"{path.name} is not a readable torch file: {type(e).__name__}") from None
        return _unwrap_state_dict(obj, path)
    raise WeightsError(f"{path.name}: weights must be a .safetensors file (or a tensors-only .pth)")


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path.name} does not hold a state dict of tensors")
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _accepted_digest(path: Path) -> str | None:
    marker = path.with_name(path.name + _ACCEPTED_SUFFIX)
    try:
        return str(json.loads(marker.read_text())["sha256"])
    except (OSError, ValueError, KeyError):
        return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
