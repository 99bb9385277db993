"""Generated benchmark data: photo-sized JPEGs of shapes whose class is the shape, not the colour.

Images are 400x300 (a typical phone photo scaled down to web size) with textured backgrounds, so decoding
costs what it costs on real photos and the task needs a few epochs to learn from scratch.
"""

from __future__ import annotations

import io
import math
import random
import shutil
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
# Other shapes for the benchmark's own "pretraining" task (no pretrained weights can be downloaded here):
# the backbone learns shape features on these, then transfers to SHAPES.
PRETRAIN_SHAPES = ("pentagon", "hexagon", "star", "ellipse", "bar", "arc")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int], angle: float
) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(3, int(r / 3)))
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "ellipse":
        draw.ellipse([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=fill)
    elif shape == "bar":
        draw.rectangle([cx - r, cy - r / 5, cx + r, cy + r / 5], fill=fill)
    elif shape == "arc":
        draw.arc(
            [cx - r, cy - r, cx + r, cy + r],
            start=math.degrees(angle),
            end=math.degrees(angle) + 180,
            fill=fill,
            width=max(3, int(r / 4)),
        )
    elif shape == "star":
        pts = [
            (
                cx + (r if k % 2 == 0 else r / 2.5) * math.cos(angle + math.pi * k / 5),
                cy + (r if k % 2 == 0 else r / 2.5) * math.sin(angle + math.pi * k / 5),
            )
            for k in range(10)
        ]
        draw.polygon(pts, fill=fill)
    else:
        n = {"square": 4, "triangle": 3, "diamond": 4, "pentagon": 5, "hexagon": 6}[shape]
        offset = angle + (math.pi / 4 if shape == "square" else 0.0)
        pts = [
            (cx + r * math.cos(offset + 2 * math.pi * k / n), cy + r * math.sin(offset + 2 * math.pi * k / n))
            for k in range(n)
        ]
        if shape == "diamond":
            pts = [(x, cy + (y - cy) * 1.6) for x, y in pts]
        draw.polygon(pts, fill=fill)


def make_photo(shape: str, rng: random.Random, size: tuple[int, int] = (400, 300)) -> bytes:
    w, h = size
    base = tuple(rng.randint(40, 215) for _ in range(3))
    img = Image.effect_noise((w, h), 40).convert("RGB")
    tint = Image.new("RGB", (w, h), base)
    img = Image.blend(img, tint, 0.6)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):  # distractor lines
        draw.line(
            [(rng.uniform(0, w), rng.uniform(0, h)), (rng.uniform(0, w), rng.uniform(0, h))],
            fill=tuple(rng.randint(0, 255) for _ in range(3)),
            width=rng.randint(1, 4),
        )
    r = rng.uniform(0.18, 0.32) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    fill = tuple(rng.randint(0, 255) for _ in range(3))
    _draw_shape(draw, shape, cx, cy, r, fill, rng.uniform(0, math.pi))  # type: ignore[arg-type]
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=88)
    return out.getvalue()


def _made(root: Path, recipe: str) -> bool:
    """Whether ``root`` holds a finished tree made by ``recipe``; one made by another (an earlier version of
    a benchmark) is removed, to be made afresh."""
    done = root / ".complete"
    if done.exists() and done.read_text() == recipe:
        return True
    if root.exists():
        shutil.rmtree(root)
    return False


def make_dataset(
    root: Path,
    *,
    classes: int = 4,
    train_per_class: int = 100,
    val_per_class: int = 25,
    seed: int = 0,
    size: tuple[int, int] = (400, 300),
    shapes: tuple[str, ...] = SHAPES,
) -> Path:
    """An ImageFolder-style ``root/{train,val}/<class>/*.jpg`` tree (both arms read the same split)."""
    recipe = repr((classes, train_per_class, val_per_class, seed, size, shapes))
    if _made(root, recipe):
        return root
    rng = random.Random(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for shape in shapes[:classes]:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:04d}.jpg").write_bytes(make_photo(shape, rng, size))
    (root / ".complete").write_text(recipe)
    return root


def make_zip(
    path: Path, *, images: int = 2000, classes: int = 4, seed: int = 1, size: tuple[int, int] = (400, 300)
) -> Path:
    """A dataset zip of ``images`` JPEGs in ``classes`` class folders (for the ingest benchmark)."""
    if path.exists():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for i in range(images):
            shape = SHAPES[i % classes]
            zf.writestr(f"{shape}/{i:05d}.jpg", make_photo(shape, rng, size))
    tmp.rename(path)
    return path


def make_split_dataset(
    root: Path,
    *,
    classes: int = 4,
    per_split: tuple[int, int, int] = (60, 20, 70),
    seed: int = 3,
    size: tuple[int, int] = (400, 300),
) -> Path:
    """``root/{train,val,test}/<class>/*.jpg``: an explicit split with a test set (for the export checks and
    the served model, which are judged on their test split)."""
    recipe = repr((classes, per_split, seed, size))
    if _made(root, recipe):
        return root
    rng = random.Random(seed)
    for split, n in zip(("train", "val", "test"), per_split, strict=True):
        for shape in SHAPES[:classes]:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:04d}.jpg").write_bytes(make_photo(shape, rng, size))
    (root / ".complete").write_text(recipe)
    return root


def zip_folder(folder: Path) -> bytes:
    """The folder as an in-memory zip (an upload)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.rglob("*.jpg")):
            zf.write(f, f.relative_to(folder))
    return buf.getvalue()
