"""Pretrained weights: torchvision's weights API and torch's cache, strictly offline unless asked.

``imagenet`` means the architecture's DEFAULT torchvision weights. Their file lives in torch's standard
cache (``$TORCH_HOME/hub/checkpoints``, or a folder the caller names) under torchvision's file name, whose
``-<hex>`` suffix is a prefix of the file's SHA-256. Nothing here downloads unless ``fetch`` is called:
a missing file is an immediate ``WeightsNotCachedError`` that names the file, its folder, its URL and the
commands that fetch or import it.

``load_state_file`` reads user-supplied weights: ``.safetensors`` always, ``.pth`` only as tensors
(``weights_only=True``), never an arbitrary pickle. A ``.safetensors`` header is read and checked first
(its size, JSON, dtypes, shapes and offsets against the file, and the caller's expectations: the keys and
shapes of the architecture), so a hostile header is refused before any tensor memory is allocated.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from math import prod
from pathlib import Path
from typing import Any

from .errors import WeightsError, WeightsNotCachedError

PRETRAINED_ARCHITECTURES = ("alexnet", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
_ACCEPTED_SUFFIX = ".accepted.json"
# A ResNet-152 header is ~100 KB; safetensors itself allows 100 MB. Anything near that is not weights.
MAX_HEADER_BYTES = 16 * 1024**2
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
INT_DTYPES = frozenset({"U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"})


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
    from .models import backbone_header_check, check_backbone_keys  # torch-heavy: imported only when needed

    check_backbone_keys(arch, load_state_file(source, check=backbone_header_check(arch)), num_classes=1000)
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


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a weights file declares it: safetensors dtype name (``F32``...) and shape."""

    dtype: str
    shape: tuple[int, ...]


# Called with every tensor a file declares, before any is loaded; raises ``WeightsError`` to refuse the file.
HeaderCheck = Callable[[dict[str, TensorInfo]], None]


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors a ``.safetensors`` file declares, read from its header alone (no tensor data is read).

    Refuses, with a ``WeightsError``, a header over ``MAX_HEADER_BYTES`` or past the end of the file, one
    that is not a JSON object, unknown dtypes, malformed shapes, and data offsets that do not tile the rest
    of the file exactly (a shape the file does not hold the bytes for, overlapping tensors, a truncated file).
    """
    path = Path(path)

    def bad(reason: str) -> WeightsError:
        return WeightsError(f"{path.name} is not a valid safetensors file: {reason}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"{size} bytes is too short to hold a header")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise bad(f"its header claims {length} bytes, over the limit of {MAX_HEADER_BYTES}")
        if 8 + length > size:
            raise bad(f"its header claims {length} bytes but the file has {size - 8} after the length (truncated)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("__metadata__ must map names to strings")
            continue
        if not isinstance(entry, dict):
            raise bad(f"the entry of {name[:80]!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise bad(f"{name[:80]!r} has an unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 16:
            raise bad(f"{name[:80]!r} has a malformed shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise bad(f"{name[:80]!r} has data offsets outside the file's {data_size} data bytes (truncated?)")
        nbytes = prod(shape) * DTYPE_BYTES[str(dtype)]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(
                f"{name[:80]!r} declares shape {tuple(shape)} ({nbytes} bytes) but holds {offsets[1] - offsets[0]}"
            )
        tensors[name] = TensorInfo(str(dtype), tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise bad(f"the data of {name[:80]!r} overlaps another tensor or leaves a gap")
        end = stop
    if end != data_size:
        raise bad(f"its tensors hold {end} bytes but the file has {data_size} (truncated or padded)")
    return tensors


def load_state_file(path: str | Path, check: HeaderCheck | None = None) -> dict[str, Any]:
    """Tensors from a ``.safetensors`` file, or a tensors-only ``.pth`` (never an arbitrary pickle).

    ``check`` sees what the file declares (names, dtypes, shapes) and may refuse it; for safetensors that
    happens before any tensor is read, so an oversized or misshapen file costs no memory."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        declared = read_safetensors_header(path)
        if check is not None:
            check(declared)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
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
        state = _unwrap_state_dict(obj, path)
        if check is not None:
            check({k: TensorInfo(_dtype_name(v.dtype), tuple(v.shape)) for k, v in state.items()})
        return state
    raise WeightsError(f"{path.name}: weights must be a .safetensors file (or a tensors-only .pth)")


_TORCH_DTYPE_NAMES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
}


def _dtype_name(dtype: Any) -> str:
    """A torch dtype by its safetensors name (``torch.float32`` -> ``F32``)."""
    name = str(dtype).removeprefix("torch.")
    return _TORCH_DTYPE_NAMES.get(name, name.upper())


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
