"""Training benchmarks: ``finetune`` (full and frozen strategies) against the PyTorch tutorial loop.

Both arms get the same ImageFolder split, the same initial backbone weights (pretrained by the benchmark
itself on other shapes, see ``pretrained_weights``: no pretrained weights can be downloaded on our
machines), the same crop size, seed and number of epochs; each arm uses its own defaults otherwise. Our arm starts each repeat with an empty pixel and feature cache, so its wall
time includes decoding every image once. Repeats alternate the arms.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ratio, stats
from bench.reference import run_tutorial

# How each architecture is pretrained (from scratch, on the other shapes). Measured on 2 CPU cores at 64 px with
# 300 images per class: resnet18 reaches ~0.75 val accuracy in 12 epochs (~110 s); AlexNet (no batch norm)
# needs a lower rate and reaches ~0.6 in 8 epochs (~210 s). 100 images per class or fewer epochs left both
# near chance, and a frozen backbone with near-random features makes the accuracy comparison meaningless.
PRETRAIN: dict[str, dict[str, Any]] = {
    "resnet18": {"epochs": 12, "lr": 2e-3},
    "alexnet": {"epochs": 8, "lr": 3e-4},
}
PRETRAIN_PER_CLASS = 300


def pretrained_weights(arch: str, work: Path, log: Any, *, crop: int = 64) -> Path:
    """The common starting point of both arms: a backbone pretrained here on other shapes.

    No pretrained weights can be downloaded on our machines, and random features make any frozen-backbone
    accuracy meaningless. So the benchmark makes its own "ImageNet": it trains the architecture from scratch
    on six shapes the benchmark task does not contain (pentagon, hexagon, star, ellipse, bar, arc), once,
    and both arms transfer from that file exactly as they would from torchvision's weights.
    """
    from safetensors.torch import save_file

    from bench.data import PRETRAIN_SHAPES, make_dataset
    from finetune.config import TrainConfig
    from finetune.train import train

    recipe = PRETRAIN.get(arch, {"epochs": 12, "lr": 1e-3})
    # The recipe is in the name: a changed recipe never reuses an older file.
    path = work / f"{arch}-pretrained-{crop}px-{PRETRAIN_PER_CLASS}x{recipe['epochs']}-lr{recipe['lr']:g}.safetensors"
    if path.exists():
        return path
    data = make_dataset(
        work / f"pretrain-data-{PRETRAIN_PER_CLASS}",
        classes=len(PRETRAIN_SHAPES),
        train_per_class=PRETRAIN_PER_CLASS,
        val_per_class=20,
        seed=11,
        shapes=PRETRAIN_SHAPES,
    )
    run = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    try:
        result = train(
            TrainConfig(
                data=str(data),
                out=str(run / "run"),
                model=arch,
                weights="none",
                strategy="full",
                epochs=recipe["epochs"],
                lr=recipe["lr"],
                crop_scale_min=0.35,  # keeps most of the shape in the crop; learns faster from scratch
                image_size=crop,
                cache_dir=str(run / "cache"),
            )
        )
        from safetensors.torch import load_file

        state = load_file(str(run / "run" / "best" / "model.safetensors"))
        # The backbone's own accuracy goes with it (read by ``backbone_accuracy`` for the report).
        save_file(state, str(path), metadata={"val_acc": f"{result.best_metric:.4f}"})
        log(
            f"  pretrained {arch} on {len(PRETRAIN_SHAPES)} other shapes ({PRETRAIN_PER_CLASS} images each, "
            f"{recipe['epochs']} epochs): val acc {result.best_metric:.3f}"
        )
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return path


def backbone_accuracy(path: Path) -> float | None:
    """The pretraining's best validation accuracy, stored in the weights file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        value = (f.metadata() or {}).get("val_acc")
    return float(value) if value is not None else None


def run_ours(
    data_dir: Path, arch: str, *, epochs: int, crop: int, init: Path, strategy: str, seed: int = 0, batch_size: int = 32
) -> dict[str, Any]:
    from finetune.config import TrainConfig
    from finetune.train import train

    work = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    epochs_log: list[dict[str, float]] = []
    throughput: list[float] = []

    def on_event(e: Any) -> None:
        if e.kind == "epoch_end":
            epochs_log.append({"elapsed": e.elapsed, "val_acc": e.val_acc})
            if e.stage == "finetune":
                throughput.append(e.images_per_sec)  # training images/s of the epoch (validation excluded)

    try:
        config = TrainConfig(
            data=str(data_dir),
            out=str(work / "run"),
            model=arch,
            weights=str(init),
            strategy=strategy,
            epochs=epochs,
            image_size=crop,
            seed=seed,
            batch_size=batch_size,
            cache_dir=str(work / "cache"),
            keep_last=1,
        )
        import time

        t0 = time.perf_counter()
        result = train(config, [on_event])
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = max(e["val_acc"] for e in epochs_log)
    return {
        "wall": wall,
        "best_acc": best,
        "epochs": epochs_log,
        "best_epoch": result.best_epoch,
        "train_images_per_sec": statistics.median(throughput) if throughput else None,
    }


def time_to(epochs: list[dict[str, float]], target: float) -> float | None:
    for e in epochs:
        if e["val_acc"] >= target:
            return e["elapsed"]
    return None


def full_finetune(
    data_dir: Path, weights_dir: Path, arch: str, *, epochs: int, crop: int, repeats: int, log: Any
) -> dict[str, Any]:
    init = pretrained_weights(arch, weights_dir, log)
    ours, ref = [], []
    for i in range(repeats):
        order = ("ours", "ref") if i % 2 == 0 else ("ref", "ours")
        for arm in order:
            if arm == "ours":
                r = run_ours(data_dir, arch, epochs=epochs, crop=crop, init=init, strategy="full")
                ours.append(r)
            else:
                rr = run_tutorial(data_dir, arch, epochs=epochs, crop=crop, init=init)
                ref.append(
                    {
                        "wall": rr.wall,
                        "best_acc": rr.best_acc,
                        "epochs": rr.epochs,
                        "train_images_per_sec": rr.train_images_per_sec,
                    }
                )
            log(
                f"  {arch} full, repeat {i + 1}, {arm}: wall {(ours if arm == 'ours' else ref)[-1]['wall']:.1f}s, "
                f"best val acc {(ours if arm == 'ours' else ref)[-1]['best_acc']:.3f}"
            )
    out = _summarise(
        ours,
        ref,
        f"full fine-tune {arch} {crop}px {epochs} epochs",
        targets={"images_per_sec": 1.5, "time_to_accuracy": 1.5, "accuracy_points": 1.0},
    )
    out["backbone_val_acc"] = backbone_accuracy(init)
    return out


def frozen(
    data_dir: Path, weights_dir: Path, arch: str, *, epochs: int, crop: int, repeats: int, log: Any
) -> dict[str, Any]:
    init = pretrained_weights(arch, weights_dir, log)
    ours, ref = [], []
    for i in range(repeats):
        order = ("ours", "ref") if i % 2 == 0 else ("ref", "ours")
        for arm in order:
            if arm == "ours":
                ours.append(run_ours(data_dir, arch, epochs=epochs, crop=crop, init=init, strategy="frozen"))
            else:
                rr = run_tutorial(data_dir, arch, epochs=epochs, crop=crop, init=init, fixed_feature_extractor=True)
                ref.append({"wall": rr.wall, "best_acc": rr.best_acc, "epochs": rr.epochs})
            log(
                f"  {arch} frozen, repeat {i + 1}, {arm}: wall {(ours if arm == 'ours' else ref)[-1]['wall']:.1f}s, "
                f"best val acc {(ours if arm == 'ours' else ref)[-1]['best_acc']:.3f}"
            )
    out = _summarise(
        ours, ref, f"frozen backbone {arch} {crop}px {epochs} epochs", targets={"wall": 10.0, "accuracy_points": 1.0}
    )
    out["backbone_val_acc"] = backbone_accuracy(init)
    return out


def _summarise(
    ours: list[dict[str, Any]], ref: list[dict[str, Any]], title: str, targets: dict[str, float]
) -> dict[str, Any]:
    out: dict[str, Any] = {"title": title, "ours": {}, "reference": {}, "ratios": {}, "targets": {}}
    out["ours"]["wall"] = stats([r["wall"] for r in ours])
    out["reference"]["wall"] = stats([r["wall"] for r in ref])
    out["ours"]["best_acc"] = stats([r["best_acc"] for r in ours])
    out["reference"]["best_acc"] = stats([r["best_acc"] for r in ref])
    out["ratios"]["wall"] = ratio(out["reference"]["wall"]["median"], out["ours"]["wall"]["median"])
    acc_gap = (out["ours"]["best_acc"]["median"] - out["reference"]["best_acc"]["median"]) * 100
    out["ratios"]["accuracy_points"] = acc_gap
    if "images_per_sec" in targets:
        o = stats([r["train_images_per_sec"] for r in ours])
        f = stats([r["train_images_per_sec"] for r in ref])
        out["ours"]["train_images_per_sec"], out["reference"]["train_images_per_sec"] = o, f
        out["ratios"]["images_per_sec"] = ratio(o["median"], f["median"])
    if "time_to_accuracy" in targets:
        # The target is 95% of the lower of the two arms' median best accuracies: both reach it.
        target = 0.95 * min(out["ours"]["best_acc"]["median"], out["reference"]["best_acc"]["median"])
        t_ours = [time_to(r["epochs"], target) for r in ours]
        t_ref = [time_to(r["epochs"], target) for r in ref]
        out["time_to_accuracy_target"] = target
        if all(t is not None for t in t_ours + t_ref):
            out["ours"]["time_to_accuracy"] = stats([t for t in t_ours if t is not None])
            out["reference"]["time_to_accuracy"] = stats([t for t in t_ref if t is not None])
            out["ratios"]["time_to_accuracy"] = ratio(
                out["reference"]["time_to_accuracy"]["median"], out["ours"]["time_to_accuracy"]["median"]
            )
    for key, goal in targets.items():
        value = out["ratios"].get(key)
        if key == "accuracy_points":
            out["targets"][key] = {"goal": f">= -{goal:g} points", "met": value is not None and value >= -goal}
        else:
            out["targets"][key] = {"goal": f">= {goal:g}x", "met": value is not None and value >= goal}
    return out
