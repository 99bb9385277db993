"""Calibration after training: temperature scaling lowers the calibration error, the checkpoint carries the
temperature and threshold that every way of serving applies, predict answers "unknown" below the threshold,
and the report lists exactly the test images the model got wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.calibration import (
    calibrate,
    calibrated,
    choose_threshold,
    coverage_curve,
    fit_temperature,
    reliability,
)
from finetune.dataset import load_dataset
from finetune.predict import UNKNOWN, Predictor
from finetune.serving import TORCH_CHANNELS_LAST, TORCH_EAGER, torch_runtime

from .helpers import Trained, lenet_config, make_shapes_dataset, run_training


def _overconfident_logits(n: int, classes: int = 5, sharpen: float = 6.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Logits of a classifier right about 70% of the time whose logits were multiplied by ``sharpen``:
    its confidence is ~20 points above its accuracy."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    honest = torch.randn(n, classes, generator=g) + 1.8 * torch.nn.functional.one_hot(labels, classes)
    return honest * sharpen, labels


def test_temperature_scaling_lowers_the_calibration_error_of_an_overconfident_model() -> None:
    logits, labels = _overconfident_logits(2000)
    fit_logits, fit_labels, held_logits, held_labels = logits[:1000], labels[:1000], logits[1000:], labels[1000:]
    t = fit_temperature(fit_logits, fit_labels)
    # Under this noise the calibrated logits are 1.8 x the honest ones (the log-likelihood ratio), so the
    # right temperature for the x6 sharpened ones is 6 / 1.8 = 3.3.
    assert 2.8 < t < 3.9
    before = reliability(calibrated(held_logits, 1.0), held_labels)["ece"]
    after = reliability(calibrated(held_logits, t), held_labels)["ece"]
    assert before > 0.15 and after < 0.05, (before, after)
    # Scaling never changes the answer, only its confidence.
    assert torch.equal(calibrated(held_logits, t).argmax(1), held_logits.argmax(1))


def test_reliability_bins_account_for_every_image() -> None:
    logits, labels = _overconfident_logits(500)
    probs = calibrated(logits, 3.0)
    r = reliability(probs, labels)
    assert len(r["bins"]) == 15 and sum(b["count"] for b in r["bins"]) == 500
    manual = sum(abs(b["accuracy"] - b["confidence"]) * b["count"] / 500 for b in r["bins"] if b["count"])
    assert r["ece"] == pytest.approx(manual)


def test_threshold_is_the_lowest_confidence_that_reaches_the_target_precision() -> None:
    # Confidences 0.95 .. 0.52; the fifth answer is wrong, and the two least confident.
    conf = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.52]
    right = [1, 1, 1, 1, 0, 1, 1, 1, 0, 0]
    probs = torch.tensor([[c, 1 - c] for c in conf])
    labels = torch.tensor([0 if r else 1 for r in right])
    assert choose_threshold(probs, labels, 1.0) == pytest.approx(0.8)  # only the first four are all right
    assert choose_threshold(probs, labels, 0.85) == pytest.approx(0.6)  # 7 of 8 right
    assert choose_threshold(probs, labels, 0.7) == 0.0  # every answer together: 7 of 10
    assert choose_threshold(probs[4:5], labels[4:5], 0.95) is None  # not even one right answer
    curve = coverage_curve(probs, labels)
    assert curve[0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": pytest.approx(0.7)}
    assert next(p for p in curve if p["threshold"] == 0.8) == {"threshold": 0.8, "coverage": 0.4, "accuracy": 1.0}


def test_a_model_right_on_every_validation_image_keeps_temperature_one() -> None:
    labels = torch.arange(4)
    assert fit_temperature(torch.eye(4) * 3, labels) == 1.0


@pytest.fixture(scope="module")
def weak_run(session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One short epoch at a low rate on 40 validation images: a model that gets many images wrong."""
    root = tmp_path_factory.mktemp("weak")
    data = make_shapes_dataset(root / "data", per_class=50, seed=7)
    return run_training(lenet_config(data, root / "run", session_cache, epochs=1, lr=1e-3, seed=3, val_fraction=0.27))


def test_the_best_checkpoint_carries_the_fitted_calibration(weak_run: Trained) -> None:
    evaluation = weak_run.result.evaluation
    c = evaluation["calibration"]
    meta = json.loads((weak_run.run_dir / "best" / "meta.json").read_text())
    assert meta["calibration"] == {k: c[k] for k in meta["calibration"]}
    assert set(meta["calibration"]) == {"temperature", "threshold", "target_precision", "fitted_on", "images"}
    assert c["val"]["nll_after"] <= c["val"]["nll_before"] + 1e-6  # the fit minimises the validation NLL
    assert {"ece_before", "ece_after", "reliability_before", "reliability_after"} <= set(c["test"])
    assert [p["threshold"] for p in c["coverage"]][:3] == [0.0, 0.05, 0.1]
    # The evaluation's per-split figures are the raw network's, untouched by calibration.
    assert "ece_before" not in evaluation["val"]


def test_predictor_and_runtimes_return_calibrated_probabilities(weak_run: Trained) -> None:
    predictor = Predictor.from_run(weak_run.run_dir, device="cpu")
    t = predictor.temperature
    assert t == json.loads((weak_run.run_dir / "best" / "meta.json").read_text())["calibration"]["temperature"]
    crops = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        logits = predictor.model(predictor.normalize(torch.from_numpy(crops)))
    expected = torch.softmax(logits / t, dim=1)
    assert torch.allclose(predictor.probabilities(list(crops)), expected, atol=1e-6)
    for name in (TORCH_EAGER, TORCH_CHANNELS_LAST):
        assert np.allclose(torch_runtime(predictor, name)(crops), expected.numpy(), atol=1e-5)


def test_the_threshold_makes_predict_answer_unknown(weak_run: Trained) -> None:
    predictor = Predictor.from_run(weak_run.run_dir, device="cpu")
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])
    top = predictor.classes[0]
    assert predictor.answer(probs, threshold=0.5) == [top, UNKNOWN]
    assert predictor.answer(probs, threshold=0.0) == [top, top]
    predictor.threshold = 0.95  # the model's own threshold applies when none is given
    assert predictor.answer(probs) == [UNKNOWN, UNKNOWN]
    predictor.threshold = None
    assert predictor.answer(probs) == [top, top]


def test_the_report_lists_exactly_the_misclassified_test_images(weak_run: Trained) -> None:
    report = json.loads((weak_run.run_dir / "report.json").read_text())
    wrong = report["misclassified"]
    predictor = Predictor.from_run(weak_run.run_dir, device="cpu")
    c = weak_run.config
    from finetune.dataset import DatasetOptions

    ds = load_dataset(
        c.data, options=DatasetOptions(val_fraction=c.val_fraction, test_fraction=c.test_fraction, seed=c.seed)
    )
    test = ds.split("test")
    probs = predictor.probabilities([predictor.preprocess(ds.root / s.path) for s in test])
    expected = [
        {
            "path": s.path,
            "true": s.label,
            "predicted": int(p.argmax()),
            "probability": pytest.approx(float(p.max()), abs=1e-6),
        }
        for s, p in zip(test, probs, strict=True)
        if int(p.argmax()) != s.label
    ]
    assert wrong["count"] == len(test) and wrong["total"] == len(expected) > 0
    assert wrong["items"] == expected


def test_the_onnx_export_applies_the_temperature(weak_run: Trained, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from finetune.export import (
        ONNX,
        ExportError,
        export_run,
        onnx_probabilities,
        onnx_session,
        read_metadata,
        verified_export,
    )

    predictor = Predictor.from_run(weak_run.run_dir, device="cpu")
    assert predictor.temperature != 1.0  # a model with wrong answers to calibrate against
    result = export_run(weak_run.run_dir, ONNX, predictor=predictor)
    assert read_metadata(ONNX, result.path)["calibration"]["temperature"] == predictor.temperature
    crops = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    exported = onnx_probabilities(onnx_session(result.path))(crops)
    assert np.allclose(exported, predictor.probabilities(list(crops)).numpy(), atol=1e-5)

    # A checkpoint whose calibration changed no longer matches the stored export: it is made again.
    meta_path = weak_run.run_dir / "best" / "meta.json"
    original = meta_path.read_text()
    try:
        meta = json.loads(original)
        meta["calibration"]["temperature"] = predictor.temperature * 2
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ExportError, match="calibration"):
            verified_export(weak_run.run_dir, ONNX)
    finally:
        meta_path.write_text(original)


def test_a_diverged_network_is_left_uncalibrated() -> None:
    logits = torch.full((40, 3), float("nan"))
    meta, report = calibrate({"val": (logits, torch.arange(40) % 3)})
    assert meta["temperature"] == 1.0 and meta["threshold"] is None and meta["fitted_on"] is None
    assert "val" not in report and "not finite" in report["note"] and json.dumps(report, allow_nan=False)


def test_too_few_validation_images_are_not_calibrated_on() -> None:
    logits, labels = _overconfident_logits(29)
    meta, report = calibrate({"val": (logits, labels)})
    assert meta["temperature"] == 1.0 and meta["threshold"] is None and "29 validation images" in report["note"]
    assert report["val"]["ece_before"] == report["val"]["ece_after"]  # still measured, for the page
    meta, report = calibrate({"val": _overconfident_logits(300)})
    assert meta["temperature"] != 1.0 and meta["fitted_on"] == "val" and report["note"] is None
