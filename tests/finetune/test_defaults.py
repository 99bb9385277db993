"""Defaults chosen from the dataset and the weights, the learning-rate range test, and the time budget."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from finetune.budget import BudgetPlan, Throughput, smaller_size
from finetune.config import TrainConfig
from finetune.defaults import DataFacts, choose_defaults
from finetune.events import BudgetPlanned, BudgetReached, DefaultsChosen, LrFound
from finetune.lrfind import END, START, choose_lr

from .helpers import lenet_config, make_shapes_dataset, run_training


def _report(side: int, train: int, classes: int) -> dict:
    """A dataset report as ``Dataset.report()`` writes it (only what the defaults read)."""
    sizes = {"min": side, "median": side, "max": side, "mean": side}
    return {
        "classes": [f"c{i}" for i in range(classes)],
        "num_images": train,
        "split_totals": {"train": train, "val": 0, "test": 0},
        "image_size": {"width": sizes, "height": sizes},
    }


def _chosen(model: str, weights: str, side: int, train: int = 12000, classes: int = 10) -> dict:
    facts = DataFacts.from_report(_report(side, train, classes))
    return {c.setting: c for c in choose_defaults(model, weights, facts)}


def test_28px_images_from_random_init_train_near_their_size_with_mild_augmentation() -> None:
    chosen = _chosen("resnet18", "none", 28)
    assert chosen["image_size"].value == 32
    assert "the images are 28 px" in chosen["image_size"].reason
    assert 0.6 <= chosen["crop_scale_min"].value <= 0.9  # no 25 % crop of a 28 px image
    assert chosen["hflip"].value is False
    assert chosen["label_smoothing"].value == 0.0 and "under-fits" in chosen["label_smoothing"].reason
    assert chosen["lr"].value == 3e-3  # every layer from scratch (AdamW)
    assert chosen["epochs"].value == 10  # 375 steps an epoch: 10 epochs reach the 2,000 steps
    assert _chosen("lenet", "none", 28, train=2100)["epochs"].value == 30  # 65 steps an epoch
    assert _chosen("lenet", "none", 28)["image_size"].value == 32
    # Never more than twice the images' size, unless the architecture cannot take less.
    assert _chosen("lenet", "none", 8)["image_size"].value == 16
    tiny = _chosen("resnet18", "none", 8)["image_size"]
    assert tiny.value == 32 and "smallest input resnet18 takes" in tiny.reason


def test_the_tiniest_images_are_barely_cropped_and_always_jittered_a_little() -> None:
    assert _chosen("lenet", "none", 8, train=1258)["crop_scale_min"].value == 0.85  # 8 px digits, 126 per class
    assert _chosen("lenet", "none", 28, train=2100)["crop_scale_min"].value == 0.7
    assert _chosen("lenet", "none", 8, train=20000)["crop_scale_min"].value == 0.9  # milder, never none
    assert _chosen("lenet", "none", 8, train=500)["crop_scale_min"].value == 0.75  # 50 per class: stronger


def test_300px_images_from_random_init_stay_at_the_architectures_size() -> None:
    chosen = _chosen("resnet18", "none", 300, train=600, classes=3)
    assert chosen["image_size"].value == 224 and "300 px" in chosen["image_size"].reason
    assert chosen["crop_scale_min"].value < 0.5
    assert chosen["hflip"].value is True
    assert chosen["label_smoothing"].value == 0.0
    assert _chosen("resnet18", "none", 100)["image_size"].value == 104  # 100 px: rounded up, under 2x


def test_pretrained_weights_keep_the_imagenet_recipe_whatever_the_images() -> None:
    # Decided from the architecture's name alone: no weight file is read (none exists in the tests).
    for side in (28, 300):
        chosen = _chosen("resnet50", "imagenet", side)
        assert chosen["image_size"].value == 224 and "ImageNet weights" in chosen["image_size"].reason
        assert chosen["crop_scale_min"].value == 0.25
        assert chosen["hflip"].value is True
        assert chosen["label_smoothing"].value == 0.1
        assert "lr" not in chosen  # open: the head stage takes 10x the default rate
        assert chosen["epochs"].value == 10
    few = _chosen("resnet50", "imagenet", 300, train=90, classes=3)
    assert few["label_smoothing"].value == 0.0


def test_settings_the_user_gave_are_kept() -> None:
    facts = DataFacts.from_report(_report(28, 1000, 10))
    given = {"image_size": 48, "hflip": True, "crop_scale_min": 0.3, "label_smoothing": 0.2, "lr": 0.01, "epochs": 5}
    assert choose_defaults("resnet18", "none", facts, given) == []
    assert DataFacts.from_report({"classes": ["a"]}) is None  # no sizes: the architecture's defaults
    sgd = choose_defaults("resnet18", "none", facts, {**given, "lr": None, "optimizer": "sgd"})
    assert sgd == []  # SGD keeps its own default rate


def test_a_run_records_its_defaults_and_trains_at_the_images_size(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "data", per_class=12, size=20)
    trained = run_training(lenet_config(data, tmp_path / "run", tmp_path / "cache", epochs=1, lr="auto"))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    chosen = {c["setting"]: c for c in info["defaults"]}
    assert chosen["image_size"]["value"] == 24 and "20 px" in chosen["image_size"]["reason"]
    assert info["config"]["image_size"] == 24 and info["preprocessing"]["crop_size"] == 24
    assert info["config"]["hflip"] is False
    events = [e for e in trained.events if isinstance(e, DefaultsChosen)]
    assert len(events) == 1 and events[0].choices == info["defaults"]
    # lr: auto ran the range test on the training images and trained at the rate it chose.
    found = [e for e in trained.events if isinstance(e, LrFound)]
    assert len(found) == 1
    lr = found[0].lr
    assert START <= lr <= END and info["config"]["lr"] == lr == info["lr_finder"]["lr"]
    assert len(info["lr_finder"]["lrs"]) == len(info["lr_finder"]["losses"]) >= 10
    assert trained.result.history[0]["lr"] <= lr


def test_lr_choice_is_the_minimum_over_ten_inside_the_range() -> None:
    lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert choose_lr(lrs, [2.0, 1.5, 1.0, 0.5, 3.0]) == pytest.approx(1e-3)
    assert choose_lr(lrs, [1.0, 2.0, 3.0, 4.0, 5.0], start=1e-5) == 1e-5  # never below the range
    assert choose_lr([], []) == START


def test_lr_auto_is_accepted_and_other_words_are_not() -> None:
    assert TrainConfig(data="d", out="o", lr="auto").validate().lr == "auto"
    with pytest.raises(Exception, match="lr must be of type float"):
        TrainConfig(data="d", out="o", lr="fast").validate()


def test_a_budget_ends_the_run_within_it(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "data", per_class=40, size=32)
    budget = 0.2  # minutes
    config = lenet_config(data, tmp_path / "run", tmp_path / "cache", epochs=1000, budget_minutes=budget)
    t0 = time.perf_counter()
    trained = run_training(config)
    elapsed = time.perf_counter() - t0
    assert elapsed <= budget * 60
    planned = [e for e in trained.events if isinstance(e, BudgetPlanned)]
    assert len(planned) == 1 and 1 <= planned[0].epochs < 1000
    assert planned[0].estimated_seconds <= budget * 60
    assert planned[0].eta is not None and 0 < planned[0].eta <= planned[0].estimated_seconds
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "succeeded" and "test" in info["evaluation"]
    assert info["config"]["epochs"] == planned[0].epochs == info["budget"]["epochs"]
    reached = [e for e in trained.events if isinstance(e, BudgetReached)]
    assert all(e.elapsed <= budget * 60 for e in reached)


def test_a_budget_also_bounds_a_two_stage_run(tmp_path: Path, lenet_weights: Path) -> None:
    data = make_shapes_dataset(tmp_path / "data", per_class=20, size=32)
    budget = 0.15  # minutes
    config = lenet_config(
        data,
        tmp_path / "run",
        tmp_path / "cache",
        weights=str(lenet_weights),
        strategy="two-stage",
        head_epochs=1000,
        epochs=1000,
        budget_minutes=budget,
    )
    t0 = time.perf_counter()
    trained = run_training(config)
    assert time.perf_counter() - t0 <= budget * 60
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "succeeded" and "test" in info["evaluation"]
    assert len(info["history"]) < 2000
    assert any(isinstance(e, BudgetPlanned) for e in trained.events)


def test_a_budget_too_small_for_the_chosen_size_picks_a_smaller_one() -> None:
    tp = Throughput(100.0, 400.0)
    # 10 s an epoch at 224 px, 30 s for the epochs: 3 fit, 5 wanted -> the largest size where 5 fit.
    plan = BudgetPlan(60.0, 3, tp, 60.0, "", fit=3, per_epoch=10.0, available=30.0)
    size = smaller_size(224, 32, plan, want=5)
    assert size is not None and size % 8 == 0 and size < 224
    assert 10.0 * (size / 224) ** 2 * 5 <= 30.0 < 10.0 * ((size + 8) / 224) ** 2 * 5
    assert smaller_size(224, 32, BudgetPlan(60.0, 5, tp, 60.0, "", fit=5, per_epoch=10.0, available=50.0), 5) is None
    hopeless = BudgetPlan(60.0, 1, tp, 60.0, "", fit=0, per_epoch=1000.0, available=1.0)
    assert smaller_size(224, 32, hopeless, want=5) == 32  # never below the architecture's smallest input


def test_a_budget_shrinks_an_image_size_the_run_chose_itself(tmp_path: Path) -> None:
    """0.9 x 3 s cannot hold 5 epochs (a checkpoint alone is planned at 0.5 s): the size chosen from the 64 px
    images (lenet's 32) goes down, and the pixels are read at the smaller size's tier."""
    data = make_shapes_dataset(tmp_path / "data", per_class=120, size=64)  # 234 training images: > 0.54 s an epoch
    config = lenet_config(data, tmp_path / "run", tmp_path / "cache", epochs=None, lr=None, budget_minutes=0.05)
    trained = run_training(config)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    size = info["config"]["image_size"]
    assert 16 <= size < 32 and info["preprocessing"]["crop_size"] == size
    chosen = {c["setting"]: c for c in info["defaults"]}
    assert chosen["image_size"]["value"] == size and "at 32 px only" in chosen["image_size"]["reason"]
    assert [e.choices for e in trained.events if isinstance(e, DefaultsChosen)][-1] == info["defaults"]
    assert info["status"] == "succeeded"
