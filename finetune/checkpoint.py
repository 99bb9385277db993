"""Checkpoints in a run directory, written so that a crash at any instant leaves a loadable one.

Layout::

    RUN/run.json                     the run: config, classes, preprocessing, dataset, status, results
    RUN/checkpoints/epoch-0007/      one immutable checkpoint:
        model.safetensors            weights
        meta.json                    architecture, classes, preprocessing, config, metrics history, ...
        train_state.pt               optimizer, scheduler, scaler, RNG (tensors only: weights_only=True)
    RUN/last -> checkpoints/epoch-0009   relative symlinks, swapped atomically
    RUN/best -> checkpoints/epoch-0007

A checkpoint is written into a temporary folder, fsynced, then renamed into place (atomic); the ``last``
and ``best`` links are replaced with ``os.replace`` (atomic). So a reader always finds the previous or
the new checkpoint, whole. Retention keeps ``best``, ``last`` and the newest ``keep_last`` epochs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_FILE = "train_state.pt"
RUN_FILE = "run.json"
FORMAT_VERSION = 1
_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


def contiguous_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in the layout safetensors wants (contiguous, on the CPU, not shared)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None,
    *,
    is_best: bool,
    update_last: bool = True,
    keep_last: int = 1,
) -> Path:
    """Write ``checkpoints/epoch-NNNN`` atomically, repoint ``last`` (and ``best``), apply retention."""
    from safetensors.torch import save_file

    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(state_dict, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default))
        if train_state is not None:
            with open(tmp / STATE_FILE, "wb") as fh:  # a Python file: its OSError is kept as the context
                torch.save(train_state, fh)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # the same epoch saved again (e.g. best and last at different times)
            _remove_unreferenced(run_dir, final)
        tmp.rename(final)
        fsync_dir(ckpt_root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) and _out_of_space(e):
            # safetensors and torch.save word a full disk their own way; raise it as the OSError it is.
            raise OSError(errno.ENOSPC, f"No space left on device while saving checkpoint {name}") from e
        raise
    if update_last:
        _point(run_dir, "last", final)
    if is_best:
        _point(run_dir, "best", final)
    fsync_dir(run_dir)
    apply_retention(run_dir, keep_last)
    return final


def _out_of_space(e: BaseException) -> bool:
    """Whether a failed write ran out of space: an OSError ENOSPC/EDQUOT anywhere in the exception's chain
    (torch.save's RuntimeError keeps the file's OSError as its context), or safetensors' message for it
    ("I/O error: No space left on device (os error 28)")."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if re.search(
            rf"No space left on device|Disk quota exceeded|os error ({errno.ENOSPC}|{errno.EDQUOT})\b", str(cur)
        ):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _point(run_dir: Path, link: str, target: Path) -> None:
    tmp = run_dir / f".{link}.{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, run_dir / link)


def _remove_unreferenced(run_dir: Path, ckpt: Path) -> None:
    trash = ckpt.with_name(f".trash-{ckpt.name}-{uuid.uuid4().hex[:8]}")
    ckpt.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def apply_retention(run_dir: Path, keep_last: int) -> None:
    ckpt_root = run_dir / "checkpoints"
    keep = {p.resolve() for p in (run_dir / "last", run_dir / "best") if p.exists()}
    epochs = sorted((p for p in ckpt_root.iterdir() if _EPOCH_DIR.match(p.name)), key=lambda p: p.name)
    keep.update(p.resolve() for p in epochs[-keep_last:])
    for p in epochs:
        if p.resolve() not in keep:
            shutil.rmtree(p, ignore_errors=True)
    # Leftovers of saves that crashed half-way are never referenced: clear them.
    for p in ckpt_root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return dict(load_file(str(self.path / MODEL_FILE), device="cpu"))

    def train_state(self) -> dict[str, Any]:
        p = self.path / STATE_FILE
        if not p.is_file():
            raise CheckpointError(f"{self.path} has no training state (it cannot be resumed from)")
        # Tensors, numbers, strings and containers only: never arbitrary pickled objects.
        return torch.load(p, map_location="cpu", weights_only=True)


def load_checkpoint(run_dir: str | Path, which: str = "best") -> Checkpoint:
    """The ``best`` or ``last`` checkpoint of a run (or a checkpoint folder given directly)."""
    run_dir = Path(run_dir)
    if (run_dir / MODEL_FILE).is_file():
        path = run_dir
    else:
        if not run_dir.is_dir():
            raise CheckpointError(f"run directory not found: {run_dir}")
        link = run_dir / which
        if not link.exists():
            other = "last" if which == "best" else "best"
            if which == "best" and (run_dir / other).exists():
                link = run_dir / other
            else:
                raise CheckpointError(
                    f"{run_dir} has no {which!r} checkpoint (training may not have finished an epoch)"
                )
        path = link.resolve()
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"{path} has no {MODEL_FILE}")
    meta = read_json(path / META_FILE)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return Checkpoint(path, meta)
