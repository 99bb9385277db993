"""Checkpoints in a run directory, written so that a crash at any instant leaves a loadable one.

Layout::

    RUN/run.json                     the run: config, classes, preprocessing, dataset, status, results
    RUN/checkpoints/epoch-0007/      one immutable checkpoint:
        model.safetensors            weights
        meta.json                    architecture, classes, preprocessing, config, metrics history, ...
                                     (and, once the run has finished, the best one's ``calibration``)
        train_state.pt               optimizer, scheduler, scaler, RNG (tensors only: weights_only=True)
    RUN/last -> checkpoints/epoch-0009   relative symlinks, swapped atomically
    RUN/best -> checkpoints/epoch-0007

A checkpoint is written into a temporary folder, fsynced, then renamed into place (atomic); the ``last``
and ``best`` links are replaced with ``os.replace`` (atomic). So a reader always finds the previous or
the new checkpoint, whole.

``last`` is the commit point: a checkpoint belongs to the run once ``last`` points at it, and its
metadata names the run's best checkpoint (``best_checkpoint``). ``best`` is re-pointed right after
``last``; a crash between the two is repaired by ``settle`` before a run resumes. Epoch numbers only
increase: a save at or before the epoch ``last`` points at is refused, and a checkpoint that ``best`` or
``last`` points at is never removed or replaced. Retention keeps ``best``, ``last`` and the newest
``keep_last`` epochs; a folder it removes is first renamed out of the ``epoch-NNNN`` names.
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


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def linked_epoch(run_dir: Path, link: str) -> int | None:
    """The epoch the ``last`` or ``best`` link points at (None without the link)."""
    try:
        match = _EPOCH_DIR.match(Path(os.readlink(run_dir / link)).name)
    except FileNotFoundError:
        return None
    return int(match.group(1)) if match else None


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None,
    *,
    best_epoch: int,
    commit: bool = True,
    keep_last: int = 1,
) -> Path:
    """Write ``checkpoints/epoch-NNNN`` atomically; with ``commit``, point ``last`` at it and ``best`` at the
    checkpoint of ``best_epoch`` (this one, or an earlier one that exists), then apply retention. Without
    ``commit`` the checkpoint is only written, for a later commit to name as its best."""
    from safetensors.torch import save_file

    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(epoch)
    last_epoch = linked_epoch(run_dir, "last")
    if last_epoch is not None and epoch <= last_epoch:
        raise CheckpointError(f"cannot save epoch {epoch}: the run is at epoch {last_epoch}, and epochs only increase")
    best = ckpt_root / checkpoint_name(best_epoch)
    if commit and best_epoch != epoch and not (best / MODEL_FILE).is_file():
        raise CheckpointError(f"the best epoch {best_epoch} has no checkpoint to point at")
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(state_dict, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        meta = {**meta, "best_checkpoint": best.name}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default))
        if train_state is not None:
            with open(tmp / STATE_FILE, "wb") as fh:  # a Python file: its OSError is kept as the context
                torch.save(train_state, fh)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # written by an attempt that died before committing it
            _remove_unreferenced(run_dir, final)
        tmp.rename(final)
        fsync_dir(ckpt_root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) and _out_of_space(e):
            # safetensors and torch.save word a full disk their own way; raise it as the OSError it is.
            raise OSError(errno.ENOSPC, f"No space left on device while saving checkpoint {name}") from e
        raise
    if commit:
        _point(run_dir, "last", final)
        _point(run_dir, "best", best)  # a crash just before this: settle() points best as last's meta says
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
    relative = os.path.relpath(target, run_dir)
    if (run_dir / link).is_symlink() and os.readlink(run_dir / link) == relative:
        return
    tmp = run_dir / f".{link}.{uuid.uuid4().hex[:8]}"
    os.symlink(relative, tmp)
    os.replace(tmp, run_dir / link)


def _referenced(run_dir: Path) -> set[Path]:
    return {(run_dir / link).resolve() for link in ("last", "best") if (run_dir / link).is_symlink()}


def _remove_unreferenced(run_dir: Path, ckpt: Path) -> None:
    """Remove a checkpoint nothing points at: renamed out of the epoch names first, so a crash half-way
    through the removal never leaves a partial ``epoch-NNNN`` folder."""
    if ckpt.resolve() in _referenced(run_dir):
        raise CheckpointError(f"{ckpt.name} is pointed at by 'best' or 'last'; it is never removed")
    trash = ckpt.with_name(f".trash-{ckpt.name}-{uuid.uuid4().hex[:8]}")
    ckpt.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _epoch_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(epoch, folder) of every checkpoint, oldest first."""
    found = ((_EPOCH_DIR.match(p.name), p) for p in ckpt_root.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def apply_retention(run_dir: Path, keep_last: int) -> None:
    ckpt_root = run_dir / "checkpoints"
    epochs = [p for _, p in _epoch_dirs(ckpt_root)]
    keep = _referenced(run_dir) | {p.resolve() for p in epochs[-keep_last:]}
    for p in epochs:
        if p.resolve() not in keep:
            _remove_unreferenced(run_dir, p)
    _clear_leftovers(run_dir)


def _clear_leftovers(run_dir: Path) -> None:
    """Leftovers of saves that crashed half-way are never pointed at: temporary and half-removed
    checkpoint folders, and links that were being made."""
    for p in (run_dir / "checkpoints").iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.iterdir():
        if p.name.startswith((".last.", ".best.")) and p.is_symlink():
            p.unlink()


def settle(run_dir: Path) -> None:
    """Make a run directory whole again after a crash at any instant, before the run resumes: ``best`` is
    what ``last``'s metadata names (a crash can fall between re-pointing the two); a ``best`` without a
    ``last`` was never committed and goes; so do checkpoints after ``last`` (written, never committed) and
    the leftovers of interrupted saves."""
    ckpt_root = run_dir / "checkpoints"
    last_epoch = linked_epoch(run_dir, "last")
    if last_epoch is None:
        (run_dir / "best").unlink(missing_ok=True)
    else:
        best = read_json(run_dir / "last" / META_FILE).get("best_checkpoint")
        if best is not None and (ckpt_root / best / MODEL_FILE).is_file():
            _point(run_dir, "best", ckpt_root / best)
    if not ckpt_root.is_dir():
        return
    for epoch, p in _epoch_dirs(ckpt_root):
        if last_epoch is None or epoch > last_epoch:
            _remove_unreferenced(run_dir, p)
    _clear_leftovers(run_dir)


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


def add_to_meta(ckpt: Checkpoint, key: str, value: Any) -> Checkpoint:
    """Record one fact learnt about a checkpoint's model after it was saved (its calibration, fitted on the
    final evaluation): ``meta.json`` is rewritten atomically, the weights are never touched."""
    meta = {**ckpt.meta, key: value}
    atomic_write_json(ckpt.path / META_FILE, meta)
    return Checkpoint(ckpt.path, meta)


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
