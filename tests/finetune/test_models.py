"""Architectures: every one builds with random weights, takes its smallest crop and has an N-way head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.errors import ConfigError, WeightsError
from finetune.models import (
    ARCHITECTURES,
    MIN_IMAGE_SIZE,
    MIN_IMAGE_SIZE_DEFAULT,
    build_model,
    forward_logits,
    head_module,
    head_names,
    inference_model,
    parameter_groups,
    preprocessing_for,
)


def test_every_architecture_is_listed() -> None:
    assert set(ARCHITECTURES) == {
        "alexnet",
        "googlenet",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "lenet",
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_builds_with_random_weights_and_gives_n_outputs(arch: str) -> None:
    n = 5
    size = MIN_IMAGE_SIZE.get(arch, MIN_IMAGE_SIZE_DEFAULT)  # the smallest crop the config accepts
    torch.manual_seed(0)
    built = build_model(arch, n, "none", image_size=size)
    assert built.weights_source == "none"
    assert built.transform_input is False
    assert built.preprocessing.crop_size == size
    assert built.preprocessing.resize_size >= size
    for name in head_names(arch):
        head = built.model.get_submodule(name)
        assert isinstance(head, nn.Linear) and head.out_features == n
    model = built.model.eval()
    with torch.no_grad():
        logits, aux = forward_logits(model, torch.randn(2, 3, size, size))
    assert logits.shape == (2, n)
    assert aux == []
    assert torch.isfinite(logits).all()
    # Layer groups for discriminative rates cover every parameter exactly once, the head last.
    groups = parameter_groups(model, arch)
    assert sum(len(g) for g in groups) == len(list(model.parameters()))
    assert {id(p) for p in groups[-1]} >= {id(p) for p in head_module(model, arch).parameters()}


def test_googlenet_train_mode_returns_aux_logits_that_forward_logits_separates() -> None:
    torch.manual_seed(0)
    model = build_model("googlenet", 3, "none", image_size=64).model
    model.train()
    raw = model(torch.randn(2, 3, 64, 64))
    assert isinstance(raw, tuple)  # GoogLeNetOutputs: a plain forward cannot be fed to a loss
    logits, aux = forward_logits(model, torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    assert len(aux) == 2 and all(a.shape == (2, 3) for a in aux)
    model.eval()
    with torch.no_grad():
        logits, aux = forward_logits(model, torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and aux == []


def test_preprocessing_follows_torchvision_and_scales_with_image_size() -> None:
    assert preprocessing_for("resnet18", "imagenet").resize_size == 256
    assert preprocessing_for("resnet50", "imagenet").resize_size == 232  # torchvision's V2 transforms
    assert preprocessing_for("resnet18", "imagenet").crop_size == 224
    small = preprocessing_for("resnet18", "imagenet", 112)
    assert (small.resize_size, small.crop_size) == (128, 112)
    lenet = preprocessing_for("lenet", "none")
    assert (lenet.resize_size, lenet.crop_size, lenet.mean) == (37, 32, (0.5, 0.5, 0.5))


def test_bad_arguments_are_input_errors() -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'vgg16'"):
        build_model("vgg16", 3)
    with pytest.raises(ConfigError, match="at least 2"):
        build_model("lenet", 1, "none")
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        build_model("lenet", 3, "imagenet")


@pytest.mark.parametrize("arch", ["resnet18", "googlenet"])
def test_inference_folds_every_batch_norm_without_tracing(arch: str) -> None:
    """Folded by walking the modules: an fx trace would patch nn.Module.__call__ for the whole process
    while it ran, breaking other threads' forward passes and exports."""
    model = build_model(arch, 3, weights="none").model
    for m in model.modules():  # running statistics of a trained network, not the identity ones
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folded = inference_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training and model.training  # a copy; the original is untouched
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected, got = forward_logits(model.eval(), x)[0], forward_logits(folded, x)[0]
    assert torch.allclose(got, expected, atol=1e-4)
