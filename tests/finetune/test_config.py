"""TrainConfig: every out-of-range or unknown value is reported, all at once."""

from __future__ import annotations

import json

import pytest

from finetune.config import TrainConfig, hyperparameters
from finetune.errors import ConfigError, InputError


def valid(**overrides: object) -> TrainConfig:
    return TrainConfig(data="data", out="run", **overrides)  # type: ignore[arg-type]


def test_defaults_are_valid() -> None:
    c = valid().validate()
    assert c.resolved_strategy() == "two-stage" and c.resolved_lr() == 1e-3
    assert valid(weights="none").resolved_strategy() == "full"
    assert valid(optimizer="sgd").resolved_lr() == 1e-2
    assert valid().resolved_head_lr() == 1e-2 and valid(optimizer="sgd").resolved_head_lr() == 1e-1
    assert valid(lr=5e-4).resolved_head_lr() == 5e-4  # a rate the user sets is used as it is
    assert valid(weights="none").resolved_backbone_lr_mult() == 1.0


def test_every_problem_is_listed() -> None:
    bad = TrainConfig(
        data="",
        out="",
        model="vgg16",
        strategy="magic",
        epochs=0,
        batch_size=0,
        lr=-1.0,
        momentum=1.5,
        label_smoothing=0.9,
        val_fraction=0.5,
        test_fraction=0.5,
        seed=-1,
        device="tpu",
        min_batch_size=64,
    )
    with pytest.raises(ConfigError) as e:
        bad.validate()
    problems = e.value.problems
    expected = [
        "model must be one of",
        "strategy must be one of",
        "epochs must be between 1 and 1000; got 0",
        "batch_size must be between 1 and 4096; got 0",
        "lr must be between 1e-07 and 10; got -1.0",
        "momentum must be between",
        "label_smoothing must be between",
        "seed must be between",
        "data is required",
        "out is required",
        "val_fraction + test_fraction must leave at least 10%",
        "device must be auto, cpu, cuda or cuda:N",
        "min_batch_size cannot be larger than batch_size",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert len(problems) == len(expected)
    assert isinstance(e.value, InputError) and "; " in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"epochs": "3"}, "epochs must be of type int"),
        ({"epochs": True}, "epochs must be of type int"),
        ({"lr": float("nan")}, "lr must be of type float"),
        ({"hflip": 1}, "hflip must be of type bool"),
        ({"model": "lenet", "weights": "imagenet"}, "lenet has no ImageNet weights"),
        ({"model": "alexnet", "image_size": 32}, "image_size must be at least 64 for alexnet"),
        ({"image_size": 2048}, "image_size must be between 16 and 1024"),
        ({"weight_decay": None}, "weight_decay is required"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of sgd, adam, adamw, rmsprop"),
    ],
)
def test_single_problems(overrides: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        valid(**overrides).validate()
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_round_trip_and_unknown_settings() -> None:
    c = valid(model="lenet", weights="none", epochs=3, lr=0.01)
    again = TrainConfig.from_dict(json.loads(c.to_json()))
    assert again == c
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"data": "d", "out": "o", "learning_rate": 1, "epoch": 2})
    assert e.value.problems == ["unknown setting 'epoch'", "unknown setting 'learning_rate'"]


def test_hyperparameters_describe_the_tunable_fields() -> None:
    table = {h["name"]: h for h in hyperparameters()}
    assert "data" not in table and "cache_dir" not in table
    assert table["lr"]["min"] == 1e-7 and table["lr"]["optional"] is True
    assert table["optimizer"]["choices"] == ["sgd", "adam", "adamw", "rmsprop"]
    json.dumps(list(table.values()))
