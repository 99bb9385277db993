"""Prediction from a run directory: the same logits as the trained model, the same pixels as training and
evaluation, whatever the input type."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.dataset import DatasetOptions
from finetune.datastore import load_into_store
from finetune.errors import ConfigError, DatasetError, ImageError
from finetune.evaluate import evaluate_run, metrics_from_logits, predict_logits
from finetune.models import build_for_checkpoint
from finetune.predict import Prediction, Predictor

from .helpers import CLASSES, Trained, image_bytes, shape_image


@pytest.fixture(scope="module")
def predictor(full_run: Trained) -> Predictor:
    return Predictor.from_run(full_run.run_dir, device="cpu")


def _logits(predictor: Predictor, arrays: list[np.ndarray]) -> torch.Tensor:
    with torch.inference_mode():
        return predictor.model(predictor.normalize(torch.from_numpy(np.stack(arrays))))


def test_predictor_reproduces_the_trained_models_evaluation(full_run: Trained, predictor: Predictor) -> None:
    c = full_run.config
    options = DatasetOptions(val_fraction=c.val_fraction, test_fraction=c.test_fraction, seed=c.seed)
    prep = predictor.preprocessing
    with load_into_store(c.data, cache_root=c.cache_dir or "", tier=prep.tier, options=options) as stored:
        ds = stored.dataset
        val = ds.split("val")
        labels = torch.tensor([s.label for s in val])

        # Decoded from the files by the predictor...
        from_files = _logits(predictor, [predictor.preprocess(ds.root / s.path) for s in val])
        # ...equal, bit for bit, the evaluation view the trainer computed from the pixel store.
        from_store, store_labels = predict_logits(predictor.model, stored.splits["val"], prep, predictor.device)
    assert torch.equal(from_files, from_store) and torch.equal(labels, store_labels)

    # The in-memory model at the end of training scored val with exactly these logits: same loss to the
    # last bit, same confusion matrix.
    assert metrics_from_logits(from_files, labels, ds.classes) == full_run.result.evaluation["val"]

    # And a network rebuilt by hand from the checkpoint file gives the same logits as the predictor.
    model = build_for_checkpoint("lenet", 3, False)
    model.load_state_dict(load_file(str(full_run.run_dir / "best" / "model.safetensors")))
    model = model.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        rebuilt = model(
            predictor.normalize(torch.from_numpy(np.stack([predictor.preprocess(ds.root / s.path) for s in val])))
        )
    assert torch.equal(rebuilt, from_files)


def test_predictions_are_stable_and_probabilities_sum_to_one(predictor: Predictor) -> None:
    img = shape_image("triangle", random.Random(3))
    (first,) = predictor.predict([img], top_k=3)
    assert predictor.predict([img], top_k=3) == [first]
    a, b = predictor.predict([img, img], top_k=3)
    assert a == b
    assert first[0].label == "triangle"
    assert [p.label for p in first] == [predictor.classes[p.index] for p in first]
    assert sum(p.probability for p in first) == pytest.approx(1.0, abs=1e-6)
    assert [p.probability for p in first] == sorted((p.probability for p in first), reverse=True)
    probs = predictor.probabilities([predictor.preprocess(img)] * 4)
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(1), torch.ones(4))


def _same(a: list[list[Prediction]], b: list[list[Prediction]]) -> None:
    assert [[(p.label, p.probability) for p in x] for x in a] == [[(p.label, p.probability) for p in x] for x in b]


@pytest.mark.parametrize(
    ("fmt", "size", "orientation"),
    [("PNG", (40, 40), None), ("JPEG", (30, 44), 6), ("JPEG", (300, 200), 8), ("GIF", (40, 40), None)],
    ids=["png", "jpeg-exif", "large-jpeg-exif", "gif"],
)
def test_bytes_path_and_pil_inputs_agree(
    predictor: Predictor, tmp_path: Path, fmt: str, size: tuple[int, int], orientation: int | None
) -> None:
    img = shape_image("circle", random.Random(1), 40).resize(size)
    params: dict[str, object] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    data = image_bytes(img, fmt, **params)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as from_bytes, Image.open(path) as from_path:
        arrays = [
            predictor.preprocess(data),
            predictor.preprocess(path),
            predictor.preprocess(str(path)),
            predictor.preprocess(from_bytes),
            predictor.preprocess(from_path),
        ]
    for arr in arrays[1:]:
        assert np.array_equal(arr, arrays[0])
    with Image.open(path) as a, Image.open(io.BytesIO(data)) as b:
        _same(predictor.predict([data, path]), predictor.predict([a, b]))


def test_an_already_loaded_pil_image_in_another_mode(predictor: Predictor) -> None:
    rgba = shape_image("square", random.Random(2)).convert("RGBA")
    rgba.load()
    _same(predictor.predict([rgba]), predictor.predict([image_bytes(rgba)]))
    assert predictor.predict([rgba], top_k=1)[0][0].label == "square"


def test_top_k_and_bad_inputs(predictor: Predictor) -> None:
    img = shape_image("square", random.Random(5))
    assert len(predictor.predict([img], top_k=1)[0]) == 1
    assert len(predictor.predict([img], top_k=50)[0]) == len(CLASSES)  # clipped to the classes there are
    with pytest.raises(ConfigError, match="top_k"):
        predictor.predict([img], top_k=0)
    with pytest.raises(ImageError, match="not an image"):
        predictor.predict([b"not an image"])
    assert predictor.predict([]) == []


def test_many_images_in_batches(predictor: Predictor) -> None:
    rng = random.Random(8)
    images = [shape_image(name, rng) for name in CLASSES for _ in range(5)]
    batched = predictor.predict(images, top_k=1, batch_size=4)
    single = [predictor.predict([img], top_k=1)[0] for img in images]
    assert [p[0].label for p in batched] == [p[0].label for p in single]
    assert [p[0].probability for p in batched] == pytest.approx([p[0].probability for p in single], abs=1e-6)


def test_last_checkpoint_and_metadata(full_run: Trained) -> None:
    p = Predictor.from_run(full_run.run_dir, "last", device="cpu")
    assert p.classes == sorted(CLASSES)
    assert p.meta["epoch"] == 4 and p.arch == "lenet"
    assert (p.preprocessing.resize_size, p.preprocessing.crop_size) == (37, 32)


def test_evaluate_run_on_a_labelled_folder(full_run: Trained, tmp_path: Path) -> None:
    rng = random.Random(77)
    data = tmp_path / "holdout"
    for name in ("square", "circle"):  # a subset of the classes, in another order
        (data / name).mkdir(parents=True)
        for i in range(6):
            shape_image(name, rng).save(data / name / f"{i}.png")
    (data / "circle" / "junk.png").write_bytes(b"nope")
    result = evaluate_run(full_run.run_dir, data, device="cpu", cache_dir=tmp_path / "cache")
    m = result["metrics"]
    assert m["count"] == 12 and result["skipped"] == 1
    assert m["top1"] >= 0.9
    assert [c["class"] for c in m["per_class"]] == sorted(CLASSES)  # the model's class order
    assert [c["support"] for c in m["per_class"]] == [6, 6, 0]


def test_evaluate_run_refuses_unknown_classes(full_run: Trained, tmp_path: Path) -> None:
    data = tmp_path / "other"
    for name in ("circle", "hexagon"):
        (data / name).mkdir(parents=True)
        shape_image("circle", random.Random(len(name)), 40).save(data / name / "a.png")
    with pytest.raises(DatasetError, match=r"\['hexagon'\] are not classes of this model"):
        evaluate_run(full_run.run_dir, data, device="cpu", cache_dir=tmp_path / "cache")
