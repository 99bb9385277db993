"""The data path at a size the rest of the suite never reaches, under a small open-file limit.

The per-image cache held one memory map (one file descriptor) per image: `finetune train` on a 2,000-image
folder failed with "Too many open files" at the Linux default ``ulimit -n 1024``. With the pixel store the
open files depend on the number of shards, not on the number of images.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.datastore import open_store

REPO = Path(__file__).resolve().parents[2]
OPEN_FILES = 256


def tiny_greyscale_folder(root: Path, n: int, classes: int = 10) -> Path:
    """``n`` 28x28 greyscale PNGs in ``classes`` folders: noise around a square whose brightness is the class
    (unchanged by flips and crops, so one epoch learns it)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % classes
        pixels = rng.integers(0, 40, (28, 28), dtype=np.uint8)
        pixels[6:22, 6:22] = 60 + 19 * label
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(folder / f"{i:05d}.png")
    return root


def limited_open_files() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, hard))


def finetune_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FINETUNE_CACHE_MAX_BYTES", None)
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=limited_open_files,
        timeout=600,
    )


def test_train_and_eval_on_5000_images_with_256_open_files(tmp_path: Path) -> None:
    data = tiny_greyscale_folder(tmp_path / "data", 5000)
    cache, run = tmp_path / "cache", tmp_path / "run"
    trained = finetune_cli(
        "train", str(data), "--out", str(run), "--model", "lenet", "--weights", "none", "--epochs", "1",
        "--batch-size", "64", "--device", "cpu", "--cache-dir", str(cache), "--json",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "succeeded" and info["dataset"]["num_images"] == 5000

    evaluated = finetune_cli("eval", str(run), str(data), "--cache-dir", str(cache), "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(evaluated.stdout.splitlines()[-1])["metrics"]
    assert metrics["count"] == 5000 and metrics["top1"] > 0.3  # chance is 0.1: it learned

    # 28 px images cost 28x28x3 bytes and a little index, never a 256 px upscale (196 KB each before).
    store = open_store(cache)
    usage = store.usage()
    store.close()
    assert usage["entries"] == 5000
    assert usage["used_bytes"] / 5000 <= 4096
    assert usage["shards"] <= 4


def test_the_cache_command_shows_and_clears_the_store(tmp_path: Path) -> None:
    data = tiny_greyscale_folder(tmp_path / "data", 40, classes=2)
    cache = tmp_path / "cache"
    trained = finetune_cli(
        "train", str(data), "--out", str(tmp_path / "run"), "--model", "lenet", "--weights", "none",
        "--epochs", "1", "--device", "cpu", "--cache-dir", str(cache),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    info = finetune_cli("cache", "--cache-dir", str(cache), "--json")
    assert info.returncode == 0, info.stderr
    usage = json.loads(info.stdout)
    assert usage["entries"] == 40 and usage["used_bytes"] > 0 and usage["pinned_bytes"] == 0
    cleared = json.loads(finetune_cli("cache", "clear", "--cache-dir", str(cache), "--json").stdout)
    assert cleared["freed_bytes"] == usage["used_bytes"] and cleared["entries"] == 0
    text = finetune_cli("cache", "--cache-dir", str(cache)).stdout
    assert "0 images in 0 shards" in text
