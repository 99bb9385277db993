"""Defaults that fit the data and the weights: the settings a user left open, chosen with a reason each.

With pretrained weights the ImageNet recipe holds: the architecture's own image size (the features were
learnt at it), random resized crops down to 25 % of the image, flips, label smoothing. From random
initialisation nothing is gained by upscaling a 28 px image to 224 px (the network learns at whatever
scale it is shown, and pays for every pixel), and the ImageNet augmentation is too strong for small
images: a 25 % crop of a 28 px digit leaves a 14 px fragment, and a flipped "7" is not a "7". So:

- image size: the images' median short side rounded up to a multiple of 8, never more than twice it, at
  least the architecture's smallest input and at most its usual size;
- crop scale: barely a crop (0.85 of the area) for images under 16 px, mild (0.6-0.85) under 64 px, more
  room as they grow, a little stronger with few images per class and milder with many;
- flips: off from random initialisation on images under 64 px (glyphs, digits, icons: orientation is
  often the class);
- label smoothing: 0.1 only with pretrained weights and at least 100 images per class. A small network
  learning from scratch under-fits (its training accuracy stays below its validation accuracy): a
  regulariser against over-confidence only slows it, and smoothed targets make its probabilities less
  faithful;
- epochs: 10 to fine-tune pretrained weights; from random initialisation about 2,000 optimizer steps
  (10 to 30 epochs): LeNet on the 28 px shapes reached 0.82 after 10 epochs and 0.93 after 30;
- learning rate (Adam, AdamW): 3e-3 when every layer learns from scratch (random initialisation, all
  layers), 3x fine-tuning's 1e-3: at 1e-3 LeNet stopped at 0.65 test accuracy on the quality benchmark's
  28 px shapes after 10 epochs, at 3e-3 it reached 0.82 (``bench/quality.py``).

``choose_defaults`` is a pure function of the architecture, the weights and the dataset's report (no
weight file, no images), so the service calls it for its form and the trainer for its run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_EPOCHS, TrainConfig
from .models import MIN_IMAGE_SIZE, MIN_IMAGE_SIZE_DEFAULT, default_image_size

# px: below TINY_IMAGE a crop is barely one (the 8 px digits of bench/quality.py, LeNet, 10 training seeds:
# min crop scale 0.7 gave 0.977 test accuracy, 0.85 gave 0.984; at 28 px 0.7 stays the best of its search);
# below SMALL_IMAGE, from random initialisation, augmentation is mild and flips are off
TINY_IMAGE = 16
SMALL_IMAGE = 64
MILDEST_CROP = 0.9  # some scale jitter is always kept: with none LeNet lost 3 to 7 points on the quality sets
MEDIUM_IMAGE = 160
FEW_PER_CLASS = 100
MANY_PER_CLASS = 1000
PRETRAINED_CROP_SCALE = 0.25
PRETRAINED_LABEL_SMOOTHING = 0.1
SCRATCH_LR = 3e-3  # Adam/AdamW, every layer from random initialisation
SCRATCH_STEPS = 2000  # optimizer steps a network from random initialisation is given by default
SCRATCH_EPOCHS = (10, 30)
DEFAULTED = ("image_size", "crop_scale_min", "hflip", "label_smoothing", "lr", "epochs")


@dataclass(frozen=True)
class DataFacts:
    """What the defaults need to know about a dataset: its images' median size and how many per class."""

    median_side: float  # px: the smaller of the median width and the median height
    train_images: int
    num_classes: int

    @property
    def per_class(self) -> float:
        return self.train_images / max(self.num_classes, 1)

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> DataFacts | None:
        """From a dataset report (``Dataset.report()``, or the service's copy of it); None without sizes."""
        sizes = report.get("image_size") or {}
        try:
            side = min(float(sizes["width"]["median"]), float(sizes["height"]["median"]))
        except (KeyError, TypeError, ValueError):
            return None
        totals = report.get("split_totals") or {}
        train = int(totals.get("train") or report.get("num_images") or 0)
        return cls(side, train, len(report.get("classes") or []) or 1)


@dataclass(frozen=True)
class Choice:
    setting: str
    value: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_defaults(
    model: str, weights: str, facts: DataFacts | None, given: Mapping[str, Any] | None = None
) -> list[Choice]:
    """A value and its reason for each of ``DEFAULTED`` that ``given`` (the user's settings) leaves None."""
    given = given or {}
    pretrained = weights != "none"
    size = given.get("image_size")
    choices: list[Choice] = []
    if size is None:
        choice = _image_size(model, pretrained, facts)
        size = choice.value
        choices.append(choice)
    if given.get("crop_scale_min") is None:
        choices.append(_crop_scale(pretrained, facts))
    if given.get("hflip") is None:
        choices.append(_hflip(pretrained, facts))
    if given.get("label_smoothing") is None:
        choices.append(_label_smoothing(pretrained, facts))
    strategy = given.get("strategy") or "auto"
    from_scratch = not pretrained and strategy in ("auto", "full")
    if given.get("epochs") is None:
        choices.append(_epochs(from_scratch, facts, int(given.get("batch_size") or 32)))
    if given.get("lr") is None and from_scratch and (given.get("optimizer") or "adamw") in ("adam", "adamw"):
        # Pretrained runs keep lr open: their head stage takes 10x the default rate (TrainConfig.resolved_head_lr).
        choices.append(
            Choice(
                "lr",
                SCRATCH_LR,
                f"learning rate {SCRATCH_LR:g}: every layer learns from random initialisation, which takes a "
                "higher rate than fine-tuning's 0.001",
            )
        )
    return choices


def _px(value: float) -> str:
    return f"{value:g} px"


def _image_size(model: str, pretrained: bool, facts: DataFacts | None) -> Choice:
    usual = default_image_size(model)
    if pretrained:
        return Choice(
            "image_size", usual, f"image size {usual}: the ImageNet weights of {model} were trained at {usual} px"
        )
    if facts is None:
        return Choice("image_size", usual, f"image size {usual}: {model}'s usual size (the images' sizes are unknown)")
    side = facts.median_side
    smallest = MIN_IMAGE_SIZE.get(model, MIN_IMAGE_SIZE_DEFAULT)
    rounded = 8 * math.ceil(side / 8)
    size = max(smallest, min(usual, rounded))
    if size > rounded:
        reason = f"the images are {_px(side)}, and {smallest} px is the smallest input {model} takes"
    elif side > usual:
        reason = (
            f"the images are {_px(side)}; from random initialisation {model} learns at its usual {usual} px "
            f"and every extra pixel costs time"
        )
    else:
        reason = f"the images are {_px(side)} (median), rounded up to a multiple of 8; larger only adds time"
    return Choice("image_size", size, f"image size {size}: {reason}")


def _crop_scale(pretrained: bool, facts: DataFacts | None) -> Choice:
    if pretrained or facts is None:
        why = "the ImageNet recipe" if pretrained else "the ImageNet recipe (the images' sizes are unknown)"
        return Choice("crop_scale_min", PRETRAINED_CROP_SCALE, f"min crop scale {PRETRAINED_CROP_SCALE}: {why}")
    side, per_class = facts.median_side, facts.per_class
    if side < TINY_IMAGE:
        scale, why = 0.85, f"{_px(side)} images have no pixels to spare: only the mildest crops keep their content"
    elif side < SMALL_IMAGE:
        scale, why = 0.7, f"{_px(side)} images keep their content only under mild crops"
    elif side < MEDIUM_IMAGE:
        scale, why = 0.5, f"{_px(side)} images take moderate crops"
    else:
        scale, why = 0.35, f"{_px(side)} images from random initialisation"
    if per_class < FEW_PER_CLASS:
        scale, why = scale - 0.1, why + f"; stronger with {per_class:.0f} images per class"
    elif per_class >= MANY_PER_CLASS:
        scale, why = scale + 0.15, why + f"; milder with {per_class:.0f} images per class"
    scale = round(min(scale, MILDEST_CROP), 2)
    return Choice("crop_scale_min", scale, f"min crop scale {scale}: {why} (a 25% crop would halve their side)")


def _hflip(pretrained: bool, facts: DataFacts | None) -> Choice:
    if pretrained or facts is None or facts.median_side >= SMALL_IMAGE:
        return Choice("hflip", True, "horizontal flips on: the ImageNet recipe")
    return Choice(
        "hflip",
        False,
        f"horizontal flips off: {_px(facts.median_side)} images are often glyphs, digits or icons whose "
        "orientation is the class",
    )


def _label_smoothing(pretrained: bool, facts: DataFacts | None) -> Choice:
    per_class = facts.per_class if facts is not None else math.inf
    if pretrained and per_class >= FEW_PER_CLASS:
        value = PRETRAINED_LABEL_SMOOTHING
        return Choice("label_smoothing", value, f"label smoothing {value}: the ImageNet recipe")
    why = (
        "from random initialisation a network under-fits rather than grows over-confident"
        if not pretrained
        else f"with {per_class:.0f} images per class the new head under-fits rather than grows over-confident"
    )
    return Choice("label_smoothing", 0.0, f"label smoothing off: {why}, and smoothed targets blur its probabilities")


def _epochs(from_scratch: bool, facts: DataFacts | None, batch_size: int) -> Choice:
    if not from_scratch or facts is None:
        why = "fine-tuning converges in a few epochs" if not from_scratch else "the dataset's size is unknown"
        return Choice("epochs", DEFAULT_EPOCHS, f"epochs {DEFAULT_EPOCHS}: {why}")
    steps = max(1, facts.train_images // batch_size)
    lo, hi = SCRATCH_EPOCHS
    epochs = max(lo, min(hi, math.ceil(SCRATCH_STEPS / steps)))
    return Choice(
        "epochs",
        epochs,
        f"epochs {epochs}: from random initialisation a network needs about {SCRATCH_STEPS} optimizer steps "
        f"({steps} an epoch at batch {batch_size}; {lo} to {hi} epochs)",
    )


def apply_defaults(config: TrainConfig, facts: DataFacts | None) -> tuple[TrainConfig, list[Choice]]:
    """``config`` with every open setting of ``DEFAULTED`` chosen, and the choices with their reasons."""
    choices = choose_defaults(config.model, config.weights, facts, config.to_dict())
    return dataclasses.replace(config, **{c.setting: c.value for c in choices}), choices


def provisional_image_size(config: TrainConfig) -> int:
    """The image size to store pixels for before the images' sizes are known: the user's, else the largest
    the defaults can pick (the architecture's usual size), so the pixels stored hold every candidate."""
    return config.image_size or default_image_size(config.model)
