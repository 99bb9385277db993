"""The pixel store's byte budget across real training runs: older datasets are evicted, a running job's
shards never are, and an evicted dataset trains again (rebuilt from its files) to the same result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.datastore import open_store
from finetune.errors import InputError
from finetune.events import BatchEnd, Event
from finetune.pixelstore import StoreFullError
from finetune.train import train

from .helpers import lenet_config, make_shapes_dataset

REPO = Path(__file__).resolve().parents[2]
# 36 images of 64x64 at LeNet's 64 px tier: 36 * 12,288 bytes = 442 KB of pixels per dataset.
PER_DATASET = 36 * 64 * 64 * 3
BUDGET = int(1.4 * PER_DATASET)  # one dataset fits, two do not


def dataset(root: Path, seed: int) -> Path:
    return make_shapes_dataset(root, per_class=12, seed=seed, size=64)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "best" / "model.safetensors"))


def stored_shas(cache: Path) -> set[str]:
    store = open_store(cache)
    rows = {r[0].hex() for r in store._db.execute("SELECT sha FROM entries")}
    store.close()
    return rows


def shas_of(folder: Path) -> set[str]:
    import hashlib

    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png")}


def untimed(history: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in h.items() if k not in ("epoch_time", "images_per_sec")} for h in history]


def config(data: Path, out: Path, cache: Path) -> object:
    return lenet_config(data, out, cache, epochs=2, batch_size=8, val_fraction=0.2, test_fraction=0.0)


def test_older_datasets_are_evicted_and_rebuilt_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_MAX_BYTES", str(BUDGET))
    a, b = dataset(tmp_path / "a", seed=1), dataset(tmp_path / "b", seed=2)
    cache = tmp_path / "cache"
    first = train(config(a, tmp_path / "run-a1", cache))  # type: ignore[arg-type]
    assert stored_shas(cache) == shas_of(a)
    train(config(b, tmp_path / "run-b", cache))  # type: ignore[arg-type]
    assert stored_shas(cache) == shas_of(b)  # a's shards made room for b's
    again = train(config(a, tmp_path / "run-a2", cache))  # type: ignore[arg-type]
    assert stored_shas(cache) == shas_of(a)  # rebuilt from a's files (and b evicted in turn)
    # The rebuilt pixels are the same pixels: the same run ends with the same weights and metrics.
    assert untimed(first.history) == untimed(again.history)
    w1, w2 = weights(first.run_dir), weights(again.run_dir)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    store = open_store(cache)
    assert store.usage()["used_bytes"] <= BUDGET
    store.close()


def test_a_running_jobs_shards_are_never_evicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_MAX_BYTES", str(BUDGET))
    a, b = dataset(tmp_path / "a", seed=1), dataset(tmp_path / "b", seed=2)
    cache = tmp_path / "cache"
    reference = train(config(a, tmp_path / "reference", tmp_path / "other-cache"))  # type: ignore[arg-type]

    other: list[subprocess.CompletedProcess[str]] = []

    def train_b_meanwhile(event: Event) -> None:
        # In the middle of a's first epoch, another process trains b on the same store, which is too
        # small for both: it may not evict a's pinned shards, so it runs over the budget instead.
        if isinstance(event, BatchEnd) and event.epoch == 1 and event.batch == 2 and not other:
            other.append(
                subprocess.run(
                    [
                        *(sys.executable, "-m", "finetune", "train", str(b), "--out", str(tmp_path / "run-b")),
                        *("--model", "lenet", "--weights", "none", "--epochs", "1", "--device", "cpu"),
                        *("--cache-dir", str(cache), "--val-fraction", "0.2", "--test-fraction", "0"),
                    ],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                    timeout=300,
                )
            )
            # Every one of a's images is still stored, beside b's: over the budget rather than under a.
            assert shas_of(a) | shas_of(b) == stored_shas(cache)

    result = train(config(a, tmp_path / "run-a", cache), [train_b_meanwhile])  # type: ignore[arg-type]
    assert other and other[0].returncode == 0, other[0].stderr[-2000:]
    # a read its pixels to the end, undisturbed: the same weights as a run with a store of its own.
    w1, w2 = weights(reference.run_dir), weights(result.run_dir)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_dataset_larger_than_the_budget_is_refused_before_it_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_MAX_BYTES", str(PER_DATASET // 3))
    a = dataset(tmp_path / "a", seed=1)
    with pytest.raises(StoreFullError, match="FINETUNE_CACHE_MAX_BYTES") as info:
        train(config(a, tmp_path / "run", tmp_path / "cache"))  # type: ignore[arg-type]
    assert isinstance(info.value, InputError)  # the CLI's exit code 2, a job's clear failure
    store = open_store(tmp_path / "cache")
    assert store.usage()["used_bytes"] <= PER_DATASET // 3
    store.close()
