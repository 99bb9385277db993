"""One run on two processes: torchrun's module starts them, gloo on the CPU, LeNet on generated shapes.

- every training image is read exactly once per epoch across the ranks;
- the loss curve matches one process with the same global batch (within 1e-5: the same images and crops
  per step, only the float sums are split differently);
- a rank killed mid-epoch ends the whole job at once (non-zero exit, well before the collective timeout),
  and a resume from the last checkpoint (``finetune train --resume``, which starts torchrun again) ends with
  exactly the weights of an uninterrupted two-rank run with the same seed.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import TrainConfig
from finetune.distributed import TIMEOUT_ENV, sync_batchnorm
from finetune.errors import ConfigError
from finetune.loader import batches, shard_batches
from finetune.models import build_model
from finetune.train import train

from .helpers import lenet_config, make_shapes_dataset, one_torch_thread

REPO = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("ddp_job.py")
RANKS, PER_RANK_BATCH, EPOCHS = 2, 4, 2
COLLECTIVE_TIMEOUT_S = 20
LOSS_TOLERANCE = 1e-5  # measured: equal to 1e-7 on this machine


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        TIMEOUT_ENV: str(COLLECTIVE_TIMEOUT_S),
    }


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}", *args]
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def _config(data: Path, out: Path, cache: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {"epochs": EPOCHS, "batch_size": PER_RANK_BATCH, "devices": RANKS, **overrides}
    return lenet_config(data, out, cache, **values)


def _launch(config: TrainConfig, records: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    records.mkdir(parents=True, exist_ok=True)
    path = records / "config.json"
    path.write_text(config.to_json())
    return _torchrun(str(JOB), str(path), str(records), *extra)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "last" / "model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 x 13 images: 24 training images (3 steps of a global batch of 8) and 9 validation images, which two
    # ranks share unevenly (5 and 4) before their logits are gathered back in order.
    return make_shapes_dataset(tmp_path_factory.mktemp("ddp-shapes"), per_class=13, seed=0)


@pytest.fixture(scope="module")
def two_ranks(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """An uninterrupted two-rank run and what each rank recorded."""
    root = tmp_path_factory.mktemp("ddp")
    config = _config(data, root / "run", root / "cache")
    done = _launch(config, root / "records")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads((root / "records" / f"rank{r}.json").read_text()) for r in range(RANKS)]
    return config, records


def test_every_training_image_is_read_once_per_epoch_across_ranks(two_ranks: Any) -> None:
    config, records = two_ranks
    n_train = json.loads(Path(config.out, "run.json").read_text())["dataset"]["split_totals"]["train"]
    assert n_train % (PER_RANK_BATCH * RANKS) == 0  # no partial global batch to drop
    for epoch in range(EPOCHS):
        per_rank = [r["epochs"][epoch] for r in records]
        assert all(len(seen) == n_train // RANKS for seen in per_rank)  # an equal share each
        everything = sorted(i for seen in per_rank for i in seen)
        assert everything == list(range(n_train)), f"epoch {epoch + 1}"
    assert records[0]["epochs"][0] != records[0]["epochs"][1]  # reshuffled each epoch


def test_run_info_states_devices_and_global_batch(two_ranks: Any) -> None:
    config, _ = two_ranks
    info = json.loads(Path(config.out, "run.json").read_text())
    assert info["status"] == "succeeded"
    training = info["training"]
    assert training["devices"] == RANKS and training["backend"] == "gloo"
    assert training["batch_per_device"] == PER_RANK_BATCH
    assert training["global_batch"] == PER_RANK_BATCH * RANKS
    assert training["lr"] == config.resolved_lr()
    assert training["batchnorm"] == "per device"


def test_loss_curve_matches_one_process_with_the_same_global_batch(two_ranks: Any, tmp_path: Path) -> None:
    config, records = two_ranks
    single = TrainConfig.from_dict(
        {**config.to_dict(), "devices": 1, "batch_size": PER_RANK_BATCH * RANKS, "out": str(tmp_path / "one")}
    )
    with one_torch_thread():
        one = train(single).history
    two = records[0]["history"]
    assert records[1]["history"] == [] or len(records[1]["history"]) == len(two)
    assert [e["epoch"] for e in one] == [e["epoch"] for e in two]
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], abs=LOSS_TOLERANCE), (a["epoch"], key)


def test_a_killed_rank_ends_the_job_and_a_resume_ends_where_an_uninterrupted_run_does(
    two_ranks: Any, data: Path, tmp_path: Path
) -> None:
    reference, _ = two_ranks
    config = _config(data, tmp_path / "run", Path(reference.cache_dir or ""))
    steps = 24 // (PER_RANK_BATCH * RANKS)
    t0 = time.monotonic()
    # Rank 1 dies at the second batch of epoch 2, after epoch 1's checkpoint.
    killed = _launch(config, tmp_path / "records", "--kill-rank", "1", "--kill-at", str(steps + 2))
    took = time.monotonic() - t0
    assert killed.returncode != 0
    assert took < 60 + COLLECTIVE_TIMEOUT_S, f"the job took {took:.0f}s to end"
    run_dir = Path(config.out)
    assert json.loads((run_dir / "last" / "meta.json").read_text())["epoch"] == 1
    # The command line reads devices=2 from the run and starts torchrun itself.
    resumed = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "--resume", str(run_dir), "--json"],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((run_dir / "last" / "meta.json").read_text())["epoch"] == EPOCHS
    expected, got = _weights(Path(reference.out)), _weights(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_several_devices_are_refused_outside_torchrun_and_for_cached_feature_strategies(
    data: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="torchrun"):
        train(_config(data, tmp_path / "a", tmp_path / "cache"))
    with pytest.raises(ConfigError, match="strategy full"):
        _config(data, tmp_path / "b", tmp_path / "cache", strategy="frozen").validate()
    # Each rank would run its own range test or throughput probe, and they could choose differently.
    with pytest.raises(ConfigError, match="lr auto"):
        _config(data, tmp_path / "c", tmp_path / "cache", lr="auto").validate()
    with pytest.raises(ConfigError, match="budget_minutes"):
        _config(data, tmp_path / "d", tmp_path / "cache", budget_minutes=1.0).validate()


def test_sync_batchnorm_is_asked_for_with_several_gpus_and_keeps_checkpoints_plain(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="with devices > 1"):
        _config(data, tmp_path / "a", tmp_path / "cache", devices=1, sync_batchnorm=True).validate()
    with pytest.raises(ConfigError, match="GPUs only"):
        _config(data, tmp_path / "b", tmp_path / "cache", device="cpu", sync_batchnorm=True).validate()
    # The conversion (run on each GPU rank before DDP wraps the model) keeps every weight's and buffer's name,
    # so its checkpoints load into the plain architecture that evaluation, export and serving build.
    plain = build_model("resnet18", 3, weights="none").model
    synced = sync_batchnorm(copy.deepcopy(plain))
    kinds = Counter(type(m).__name__ for m in synced.modules())
    assert kinds["SyncBatchNorm"] == 20 and kinds["BatchNorm2d"] == 0
    assert list(synced.state_dict()) == list(plain.state_dict())
    fresh = build_model("resnet18", 3, weights="none").model
    fresh.load_state_dict(synced.state_dict())


def test_sync_batchnorm_on_cpu_ranks_ends_the_run_with_the_reason(data: Path, tmp_path: Path) -> None:
    """Two gloo ranks (the device left at auto, so validation cannot tell): each refuses before training."""
    done = _launch(_config(data, tmp_path / "run", tmp_path / "cache", sync_batchnorm=True), tmp_path / "records")
    assert done.returncode != 0
    assert "sync_batchnorm runs on GPUs only" in done.stdout + done.stderr
    assert not (tmp_path / "run" / "last").exists()


def test_the_sharded_order_deals_each_global_batch_out_across_ranks() -> None:
    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(7)

    n, batch, ranks = 27, 4, 2
    order, _ = shard_batches(n, batch, 0, ranks, generator=gen())
    shares = [shard_batches(n, batch, r, ranks, generator=gen())[1] for r in range(ranks)]
    assert order == batches(n, batch * ranks, generator=gen(), drop_last=True)  # one process, global batch
    for step, global_batch in enumerate(order):
        assert sorted(i for share in shares for i in share[step]) == sorted(global_batch)
        assert all(len(share[step]) == batch for share in shares)
    seen = [i for share in shares for b in share for i in b]
    assert len(seen) == len(set(seen)) == 24  # 3 global batches; the last 3 images wait for another epoch
    # One rank: exactly the batches one process has always read.
    assert shard_batches(n, batch, 0, 1, generator=gen())[1] == batches(n, batch, generator=gen(), drop_last=True)
