"""Generated test data for the engine tests (coloured-shape images, image files in every mode, zips)
and small LeNet training runs.

Everything is built in a temporary folder at test time; no binary file is committed.
"""

from __future__ import annotations

import io
import os
import random
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from finetune.config import TrainConfig
from finetune.events import Event
from finetune.train import RunResult, train

# Three classes that differ in colour and in shape, so any working model separates them quickly.
CLASSES = {
    "circle": ((220, 40, 40), "ellipse"),
    "square": ((40, 170, 60), "rectangle"),
    "triangle": ((40, 60, 220), "triangle"),
}


def shape_image(name: str, rng: random.Random, size: int = 40) -> Image.Image:
    """One image of class ``name``: its shape in its colour (jittered) at a random place and size."""
    colour, shape = CLASSES[name]
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    side = rng.randint(size // 2, size - 4)
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    if shape == "ellipse":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
    return img


def make_shapes_dataset(
    root: Path, per_class: int = 24, *, seed: int = 0, size: int = 40, classes: Iterable[str] = CLASSES
) -> Path:
    """A folder with one sub-folder of PNGs per class; returns ``root``."""
    rng = random.Random(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(name, rng, size).save(folder / f"{name}-{i:03d}.png")
    return root


def solid(colour: tuple[int, ...], size: tuple[int, int] = (24, 24), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def image_bytes(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def distinct_pngs(n: int, *, seed: int = 0, size: int = 16) -> list[bytes]:
    """``n`` different small PNGs (random noise, so no two are byte-identical)."""
    rng = random.Random(seed)
    return [image_bytes(Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))) for _ in range(n)]


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A valid small PNG whose header is rewritten to claim ``width`` x ``height`` pixels (CRC fixed):
    a decompression bomb as far as any decoder that trusts the header can tell."""
    data = bytearray(image_bytes(solid((10, 20, 30), (8, 8))))
    # Signature (8 bytes), then the IHDR chunk: length (4), type (4), width (4), height (4), ...
    struct.pack_into(">II", data, 16, width, height)
    ihdr = bytes(data[12:29])  # type + 13 bytes of data
    struct.pack_into(">I", data, 29, zlib.crc32(ihdr))
    return bytes(data)


def write_zip(path: Path, entries: Iterable[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def symlink_entry(name: str) -> zipfile.ZipInfo:
    """A zip entry that unzip tools would restore as a symbolic link."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def set_encrypted_flag(path: Path) -> None:
    """Set the 'encrypted' general-purpose bit on every entry (local and central headers) of a zip.
    ``zipfile`` clears that bit when writing, so the bytes are patched afterwards."""
    data = bytearray(path.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (i := data.find(signature, start)) != -1:
            data[i + flag_offset] |= 0x1
            start = i + 4
    path.write_bytes(bytes(data))


def lenet_config(data: Path, out: Path, cache: Path, **overrides: Any) -> TrainConfig:
    """A LeNet run that learns the shapes dataset in a few seconds on two CPU cores."""
    values: dict[str, Any] = {
        "data": str(data),
        "out": str(out),
        "model": "lenet",
        "weights": "none",
        "strategy": "full",
        "epochs": 4,
        "head_epochs": 3,
        "batch_size": 8,
        "lr": 3e-3,
        "val_fraction": 0.2,
        "test_fraction": 0.15,
        "device": "cpu",
        "seed": 1,
        "cache_dir": str(cache),
    }
    values.update(overrides)
    return TrainConfig(**values)


@dataclass
class Trained:
    """A finished run and every event it emitted."""

    config: TrainConfig
    result: RunResult
    events: list[Event] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.result.run_dir


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for what runs inside. The models here are tiny: one thread is as fast, and on a
    busy 2-core machine it avoids OpenMP threads spinning against each other (3-4x slower with 2 under load).
    Runs compared bit for bit must also use the same count: float sums reduced over a different number of
    threads differ in the last bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_training(config: TrainConfig) -> Trained:
    # Session fixtures are built before conftest's package-wide one-thread fixture applies: without this,
    # the shared runs would use every core and the resume tests compare against them bit for bit.
    with one_torch_thread():
        events: list[Event] = []
        result = train(config, [events.append])
    return Trained(config, result, events)


class StopWhen:
    """A cancel flag that is raised once ``predicate`` accepts an event (like a user pressing Stop)."""

    def __init__(self, predicate: Callable[[Event], bool]) -> None:
        self.predicate = predicate
        self.raised = False

    def __call__(self, event: Event) -> None:
        self.raised = self.raised or self.predicate(event)

    def should_stop(self) -> bool:
        return self.raised


class Killed(BaseException):
    """A simulated kill -9. A BaseException, so no ``except Exception`` handler takes it for an error."""


class FsKill:
    """Records every change made under ``root`` (a new folder, a rename or replace, a new link, a removal),
    in order. With ``at``, the process is "killed" just before change number ``at``: that change and every
    later one, anywhere, raise ``Killed``, so nothing after it reaches the disk (cleanup handlers included),
    as after a kill -9. Writes into new files are not counted: the code only ever writes into files and
    folders nothing points at yet, and the changes counted are the ones that make them visible."""

    OPS = ("mkdir", "rename", "replace", "symlink", "unlink", "rmdir")

    def __init__(self, root: Path, at: int | None = None) -> None:
        self.root = os.path.realpath(root)
        self.at = at
        self.steps: list[str] = []
        self.killed = False
        self._real: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> FsKill:
        for name in self.OPS:
            self._real[name] = getattr(os, name)
            setattr(os, name, self._wrap(name, self._real[name]))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, real in self._real.items():
            setattr(os, name, real)

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            paths = self._paths(name, args, kwargs)
            ours = any(p == self.root or p.startswith(self.root + os.sep) for p in paths)
            if self.killed or (ours and self.at is not None and len(self.steps) == self.at):
                self.killed = True
                raise Killed(f"killed before {name} {' '.join(paths)}")
            result = real(*args, **kwargs)
            if ours:  # counted once done: a call that fails (an existing folder) changed nothing
                self.steps.append(f"{name} {' '.join(paths)}")
            return result

        return op

    @staticmethod
    def _paths(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
        def full(path: Any, dir_fd: int | None) -> str:
            base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
            where = os.path.normpath(os.path.join(base, os.fsdecode(path)))
            # The folder resolved, not the name itself (which may be a link: "last", "best").
            return os.path.join(os.path.realpath(os.path.dirname(where)), os.path.basename(where))

        if name in ("rename", "replace"):
            return [full(args[0], kwargs.get("src_dir_fd")), full(args[1], kwargs.get("dst_dir_fd"))]
        if name == "symlink":  # the first argument is the link's content, not a path acted on
            return [full(args[1], kwargs.get("dir_fd"))]
        return [full(args[0], kwargs.get("dir_fd"))]
