"""Architectures: torchvision classifiers with a new head for N classes, plus LeNet.

Everything architecture-specific lives here: which module is the head, the layer groups used for
discriminative learning rates, the preprocessing each expects, and GoogLeNet's two quirks (auxiliary
heads, ``transform_input``) handled in one place.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, WeightsError
from .weights import (
    FLOAT_DTYPES,
    INT_DTYPES,
    PRETRAINED_ARCHITECTURES,
    HeaderCheck,
    TensorInfo,
    cached_imagenet_path,
    imagenet_weights,
    load_state_file,
)

log = logging.getLogger(__name__)

ARCHITECTURES = (*PRETRAINED_ARCHITECTURES, "lenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Smallest crop each network still turns into a valid feature map (checked by the tests).
MIN_IMAGE_SIZE = {"alexnet": 64, "googlenet": 32, "lenet": 16}
MIN_IMAGE_SIZE_DEFAULT = 32
MAX_IMAGE_SIZE = 1024
AUX_LOSS_WEIGHT = 0.3  # GoogLeNet paper: auxiliary losses are added with weight 0.3 during training


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing = resize the short side to ``resize_size``, centre-crop ``crop_size``, normalise,
    starting from the pixels stored at ``tier`` (``finetune.preprocess``). Stored in every checkpoint;
    the pixel store, evaluation, prediction and export all follow it."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tier: int = 0  # the stored resolution; 0 = derived from resize_size (checkpoints made before tiers)

    def __post_init__(self) -> None:
        if not self.tier:
            from .preprocess import store_tier

            object.__setattr__(self, "tier", store_tier(self.resize_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            int(d["resize_size"]), int(d["crop_size"]), tuple(d["mean"]), tuple(d["std"]), int(d.get("tier") or 0)
        )


def default_image_size(arch: str) -> int:
    return 32 if arch == "lenet" else 224


def preprocessing_for(arch: str, weights: str, image_size: int | None = None) -> Preprocessing:
    """The preprocessing a model expects: from torchvision's weights transforms for ImageNet weights
    (ResNet-50 and deeper use 232/224), else 256/224 (LeNet: 37/32), scaled to ``image_size``."""
    check_arch(arch)
    if arch == "lenet":
        base_resize, base_crop, mean, std = 37, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        t = imagenet_weights(arch).transforms()
        base_resize, base_crop = int(t.resize_size[0]), int(t.crop_size[0])
        mean, std = tuple(t.mean), tuple(t.std)
    crop = image_size or base_crop
    resize = base_resize if crop == base_crop else max(crop, round(crop * base_resize / base_crop))
    return Preprocessing(resize, crop, mean, std)


def check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ConfigError([f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}"])


class LeNet(nn.Module):
    """LeNet-5 for RGB input: two 5x5 convolutions with pooling, then 120-84-N fully connected layers.
    An adaptive pool before the classifier lets it take 16-64 px crops (32 px is the classic size)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((5, 5)),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.classifier(self.features(x)))


@dataclass
class BuiltModel:
    model: nn.Module
    arch: str
    preprocessing: Preprocessing
    transform_input: bool  # GoogLeNet only: input renormalised inside the network (ImageNet weights)
    weights_source: str  # "imagenet:<enum>", "none", or "file:<path>"


def _construct(arch: str, num_classes: int, *, transform_input: bool) -> nn.Module:
    """The bare network with torchvision's own head size ``num_classes``; no weights loaded."""
    if arch == "lenet":
        return LeNet(num_classes)
    from torchvision import models as tvm

    if arch == "googlenet":
        # Built with auxiliary heads: they add a regularising loss during full fine-tuning and are
        # ignored in eval mode, where GoogLeNet returns only the main logits.
        return tvm.googlenet(
            weights=None, num_classes=num_classes, aux_logits=True, transform_input=transform_input, init_weights=True
        )
    builder = getattr(tvm, arch)
    return builder(weights=None, num_classes=num_classes)


def head_names(arch: str) -> list[str]:
    """Module names of the layers replaced for N classes (the new head, trained at the full rate)."""
    if arch == "alexnet":
        return ["classifier.6"]
    if arch == "googlenet":
        return ["fc", "aux1.fc2", "aux2.fc2"]
    return ["fc"]


def main_head_name(arch: str) -> str:
    return head_names(arch)[0]


def _get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_heads(model: nn.Module, arch: str, num_classes: int) -> None:
    for name in head_names(arch):
        old = _get_module(model, name)
        assert isinstance(old, nn.Linear)
        new = nn.Linear(old.in_features, num_classes)
        _set_module(model, name, new)


def build_model(
    arch: str,
    num_classes: int,
    weights: str = "none",
    *,
    image_size: int | None = None,
    weights_dir: str | Path | None = None,
) -> BuiltModel:
    """A network for ``num_classes`` with ``weights``: "imagenet" (cached torchvision file, offline),
    "none" (random initialisation) or the path of a ``.safetensors``/tensors-only ``.pth`` file."""
    check_arch(arch)
    if num_classes < 2:
        raise ConfigError([f"num_classes must be at least 2, got {num_classes}"])
    path: Path | None
    if weights == "imagenet":
        if arch == "lenet":
            raise WeightsError("lenet has no ImageNet weights; use weights='none'")
        path = cached_imagenet_path(arch, weights_dir)  # fails fast when the file is missing
        source = f"imagenet:{imagenet_weights(arch)}"
    elif weights == "none":
        path, source = None, "none"
    else:
        path, source = Path(weights), f"file:{weights}"
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
    # torchvision converts GoogLeNet's ImageNet weights to expect (x-0.5)/0.5 input and sets
    # transform_input=True to renormalise ImageNet-normalised input inside the network. Weights files
    # we are handed follow the same convention; only random initialisation needs no renormalising.
    transform_input = arch == "googlenet" and weights != "none"
    if path is None:
        model = _construct(arch, num_classes, transform_input=transform_input)
    else:
        model = _construct(arch, 1000 if arch != "lenet" else num_classes, transform_input=transform_input)
        # The file's header is checked against this network before any of its tensors is read.
        state = load_state_file(path, check=_header_check(model, arch))
        load_backbone(model, arch, state)
        replace_heads(model, arch, num_classes)
    prep = preprocessing_for(arch, "imagenet" if arch != "lenet" else "none", image_size)
    return BuiltModel(model, arch, prep, transform_input, source)


def build_for_checkpoint(arch: str, num_classes: int, transform_input: bool) -> nn.Module:
    """The network a checkpoint was saved from (weights are loaded by the caller)."""
    return _construct(arch, num_classes, transform_input=transform_input)


def _is_head_key(arch: str, key: str) -> bool:
    return any(key.startswith(name + ".") for name in head_names(arch))


def check_backbone_keys(arch: str, state: dict[str, torch.Tensor], num_classes: int = 1000) -> None:
    """Raise ``WeightsError`` listing every missing, unexpected or misshapen backbone tensor."""
    _compare(_bare(arch, num_classes), arch, state)


def backbone_header_check(arch: str, num_classes: int = 1000) -> HeaderCheck:
    """``load_state_file``'s check that a file's declared tensors fit ``arch`` (before any is read)."""
    return _header_check(_bare(arch, num_classes), arch)


def _bare(arch: str, num_classes: int) -> nn.Module:
    return _construct(arch, num_classes, transform_input=False) if arch != "lenet" else LeNet(num_classes)


def _header_check(model: nn.Module, arch: str) -> HeaderCheck:
    expected = {k: v for k, v in model.state_dict().items() if not _is_head_key(arch, k)}

    def check(declared: dict[str, TensorInfo]) -> None:
        given = {k: v.shape for k, v in declared.items() if not _is_head_key(arch, k)}
        problems = _problems(arch, {k: tuple(v.shape) for k, v in expected.items()}, given)
        for k, v in expected.items():
            kinds = FLOAT_DTYPES if v.is_floating_point() else INT_DTYPES
            if k in declared and declared[k].dtype not in kinds:
                need = "a floating-point" if v.is_floating_point() else "an integer"
                problems.append(f"dtype of {k}: file has {declared[k].dtype}, {arch} needs {need} tensor")
        _raise_if(arch, problems)

    return check


def _compare(model: nn.Module, arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not _is_head_key(arch, k)}
    given = {k: v for k, v in state.items() if not _is_head_key(arch, k)}
    _raise_if(arch, _problems(arch, expected, {k: tuple(v.shape) for k, v in given.items()}))
    return given


def _problems(arch: str, expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and misshapen tensors (head tensors already left out of both)."""
    optional = ("aux1.", "aux2.")  # GoogLeNet files may come without auxiliary heads
    problems = [f"missing: {k}" for k in expected if k not in given and not k.startswith(optional)]
    problems += [f"unexpected: {k[:200]}" for k in given if k not in expected]
    problems += [
        f"shape of {k}: file has {given[k]}, {arch} needs {shape}"
        for k, shape in expected.items()
        if k in given and given[k] != shape
    ]
    return problems


def _raise_if(arch: str, problems: list[str]) -> None:
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise WeightsError(f"weights do not fit {arch} ({len(problems)} mismatches): " + "; ".join(shown))


def load_backbone(model: nn.Module, arch: str, state: dict[str, torch.Tensor]) -> None:
    """Load every non-head tensor (the head is replaced anyway); mismatches are listed, not ignored."""
    given = _compare(model, arch, state)
    model.load_state_dict(given, strict=False)


def forward_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, auxiliary logits) for one forward pass; only GoogLeNet in train mode has aux."""
    out = model(x)
    if isinstance(out, tuple) and hasattr(out, "logits"):  # GoogLeNetOutputs(logits, aux_logits2, aux_logits1)
        aux = (getattr(out, "aux_logits1", None), getattr(out, "aux_logits2", None))
        return out.logits, [a for a in aux if a is not None]
    return out, []


def inference_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy for inference with batch norm folded into the convolutions before it, which saves a
    pass over every feature map: ~1.4x at batch 1 on a CPU. Outputs match the unfused network to float
    rounding; the final evaluation and the predictor both use this, so they agree exactly.

    The fold walks the modules instead of tracing the network with torch.fx: an fx trace patches
    ``nn.Module.__call__`` for the whole process while it runs, so a model loading in one thread of the
    service broke the forward passes and exports of every other thread ("module is not installed as a
    submodule"). The folded copy is checked against the original on a random batch and dropped if they
    differ (a network whose layers are not registered in the order they run)."""
    model = copy.deepcopy(model).eval()
    folded = copy.deepcopy(model)
    if not _fold_batchnorm(folded):
        return model
    if not _same_outputs(model, folded):
        log.info("batch-norm folding skipped for %s: its outputs differed", type(model).__name__)
        return model
    return folded


def _fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that is registered right after a Conv2d of its width in the same parent (the
    torchvision layout: ``conv1``/``bn1``, ``downsample = (conv, bn)``, ``BasicConv2d.conv``/``.bn``) into
    that convolution, leaving an Identity in its place. Returns how many were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    count = 0
    for parent in list(model.modules()):
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(list(parent.named_children())):
            if (
                isinstance(conv, nn.Conv2d)
                and type(bn) is nn.BatchNorm2d
                and bn.num_features == conv.out_channels
                and bn.running_mean is not None
                and bn.running_var is not None
            ):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
                count += 1
    return count


def _same_outputs(a: nn.Module, b: nn.Module, size: int = 96) -> bool:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, size, size, generator=generator)
    try:
        with torch.inference_mode():
            ya, yb = a(x), b(x)
    except Exception as e:  # too small an input for this network: no verdict, keep the eager one
        log.info("batch-norm folding not checked for %s: %s", type(a).__name__, e)
        return False
    ya = ya[0] if isinstance(ya, tuple | list) else ya
    yb = yb[0] if isinstance(yb, tuple | list) else yb
    return bool(torch.allclose(ya, yb, rtol=1e-3, atol=1e-4 * (1.0 + float(ya.abs().max()))))


class Backbone(nn.Module):
    """The network without its head, in eval mode: maps images to the features the head reads."""

    def __init__(self, model: nn.Module, arch: str) -> None:
        super().__init__()
        self.arch = arch
        self.model = model
        self.head_name = main_head_name(arch)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = _get_module(self.model, self.head_name)
        _set_module(self.model, self.head_name, nn.Identity())
        try:
            return self.model(x)
        finally:
            _set_module(self.model, self.head_name, head)


def head_module(model: nn.Module, arch: str) -> nn.Linear:
    head = _get_module(model, main_head_name(arch))
    assert isinstance(head, nn.Linear)
    return head


def parameter_groups(model: nn.Module, arch: str) -> list[list[nn.Parameter]]:
    """Parameters in layer groups from the input to the head (the last group), for discriminative
    learning rates: earlier layers hold generic features and move least."""
    if arch.startswith("resnet"):
        names = [["conv1", "bn1", "layer1"], ["layer2"], ["layer3"], ["layer4"]]
    elif arch == "alexnet":
        names = [
            ["features.0", "features.3"],
            ["features.6", "features.8", "features.10"],
            ["classifier.1", "classifier.4"],
        ]
    elif arch == "googlenet":
        names = [
            ["conv1", "conv2", "conv3", "inception3a", "inception3b"],
            ["inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "aux1", "aux2"],
            ["inception5a", "inception5b"],
        ]
    else:
        names = [["features"], ["classifier"]]
    heads = head_names(arch)
    groups: list[list[nn.Parameter]] = [[] for _ in range(len(names) + 1)]
    for pname, param in model.named_parameters():
        if any(pname.startswith(h + ".") for h in heads):
            groups[-1].append(param)
            continue
        for i, prefixes in enumerate(names):
            if any(pname == p or pname.startswith(p + ".") for p in prefixes):
                groups[i].append(param)
                break
        else:
            raise AssertionError(f"parameter {pname} of {arch} belongs to no layer group")
    return groups


def state_fingerprint(module: nn.Module, exclude_prefix: str | None = None) -> str:
    """A hash of every tensor in ``module`` except those under ``exclude_prefix`` (identifies a backbone
    for the feature cache)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if exclude_prefix and name.startswith(exclude_prefix):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
