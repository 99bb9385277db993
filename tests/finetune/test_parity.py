"""Train/serve parity: for every image size, the tensor evaluation sees (from the pixel store) and the tensor
the predictor builds (from the file's bytes) are identical, bit for bit.

Before the store, evaluation cut the long side to 4:3 with a floor offset and then centre-cropped with a
rounded one, while prediction cropped the uncut image: a 400x256 image was cropped at x=87 in evaluation
and x=88 in prediction. The issue's sizes are pinned as examples; hypothesis covers the rest.
"""

from __future__ import annotations

import io
import itertools
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from finetune.dataset import DatasetOptions
from finetune.datastore import load_into_store
from finetune.loader import Normalizer
from finetune.models import LeNet, Preprocessing
from finetune.predict import Predictor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (resize, crop): ResNet/AlexNet/GoogLeNet at 224, ResNet-50 V2's 232, LeNet, 128 and 384 crops.
PREPS = [(256, 224), (232, 224), (37, 32), (146, 128), (439, 384)]
_counter = itertools.count()


def encoded(width: int, height: int, fmt: str, orientation: int) -> bytes:
    """A deterministic pattern with detail at every scale (so any crop or resize offset shows)."""
    y, x = np.ogrid[:height, :width]
    rgb = np.stack([(x * 7 + y * 3) % 256, (x * 13 ^ y * 5) % 256, ((x + 1) * (y + 1)) % 251], axis=-1)
    img = Image.fromarray(rgb.astype(np.uint8))
    out = io.BytesIO()
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(out, "JPEG", quality=90, exif=exif.tobytes())
    else:
        img.save(out, "PNG", compress_level=1)
    return out.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity")


def predictor_for(prep: Preprocessing) -> Predictor:
    meta = {"arch": "lenet", "class_names": ["a", "b"], "preprocessing": prep.to_dict()}
    return Predictor(LeNet(2), meta, torch.device("cpu"))


def evaluation_view(workspace: Path, data: bytes, prep: Preprocessing) -> tuple[np.ndarray, torch.Tensor]:
    """What ``finetune eval`` and the trainer's evaluation compute: the dataset check stores the file, the
    evaluation batch is cut from the store."""
    root = workspace / "data" / uuid.uuid4().hex
    (root / "a").mkdir(parents=True)
    (root / "a" / f"{next(_counter)}.img").write_bytes(data)
    options = DatasetOptions(evaluate_only=True)
    with load_into_store(root, cache_root=workspace / "cache", tier=prep.tier, options=options) as stored:
        images = stored.splits["test"]
        assert len(images) == 1, stored.dataset.skipped
        batch = images.center_crops([0], prep)
        pixels = batch.pixels.numpy()[0].copy()
        tensor = Normalizer(prep, torch.device("cpu"), True)(batch.pixels)
    return pixels, tensor


def prediction_view(data: bytes, prep: Preprocessing) -> tuple[np.ndarray, torch.Tensor]:
    predictor = predictor_for(prep)
    pixels = predictor.preprocess(data)
    return pixels, predictor.normalize(torch.from_numpy(pixels[None]))


sizes = st.tuples(st.integers(1, 4000), st.integers(1, 4000))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=sizes,
    prep=st.sampled_from(PREPS),
    fmt=st.sampled_from(["JPEG", "PNG"]),
    orientation=st.sampled_from([1, 6, 8]),
)
@example(size=(400, 256), prep=(256, 224), fmt="JPEG", orientation=1)
@example(size=(1920, 1080), prep=(256, 224), fmt="JPEG", orientation=1)
@example(size=(1080, 1920), prep=(256, 224), fmt="JPEG", orientation=1)
@example(size=(512, 256), prep=(256, 224), fmt="PNG", orientation=1)
@example(size=(350, 256), prep=(256, 224), fmt="PNG", orientation=1)
@example(size=(28, 28), prep=(256, 224), fmt="PNG", orientation=1)  # upscaled at evaluation, never stored so
@example(size=(4000, 500), prep=(37, 32), fmt="JPEG", orientation=6)  # 8:1, rotated, JPEG draft decode
@example(size=(1, 8), prep=(146, 128), fmt="PNG", orientation=1)
def test_evaluation_and_prediction_see_the_same_tensor(
    workspace: Path, size: tuple[int, int], prep: tuple[int, int], fmt: str, orientation: int
) -> None:
    width, height = size
    assume(max(width, height) <= 8 * min(width, height))  # up to 8:1 both ways
    assume(fmt == "JPEG" or width * height <= 2_000_000)  # large PNGs only make the test slow
    preprocessing = Preprocessing(prep[0], prep[1], MEAN, STD)
    data = encoded(width, height, fmt, orientation)
    eval_pixels, eval_tensor = evaluation_view(workspace, data, preprocessing)
    pred_pixels, pred_tensor = prediction_view(data, preprocessing)
    assert eval_pixels.shape == (prep[1], prep[1], 3)
    assert np.array_equal(eval_pixels, pred_pixels)
    assert torch.equal(eval_tensor, pred_tensor)


def test_small_images_are_stored_at_their_own_size_and_resized_for_the_model(workspace: Path) -> None:
    """A 28 px image costs 28x28x3 bytes in the store, not 256x256x3; evaluation upscales it on the fly."""
    prep = Preprocessing(256, 224, MEAN, STD)
    root = workspace / "small"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(encoded(28, 28, "PNG", 1))
    with load_into_store(
        root, cache_root=workspace / "cache-small", tier=prep.tier, options=DatasetOptions(evaluate_only=True)
    ) as stored:
        (entry,) = stored.splits["test"].entries
        assert (entry.height, entry.width) == (28, 28) and entry.nbytes == 28 * 28 * 3
        assert stored.splits["test"].center_crops([0], prep).pixels.shape == (1, 224, 224, 3)
