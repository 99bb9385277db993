"""Calibration: temperature scaling, the expected calibration error, and the "unknown" threshold.

After training, one scalar temperature ``T`` is fitted on the validation split's logits by minimising the
negative log-likelihood of ``softmax(logits / T)`` with L-BFGS (Guo et al., "On Calibration of Modern Neural
Networks", 2017). Dividing every logit by the same ``T`` never changes the top-1 label, only how confident
the probabilities are. ``T`` lives in the best checkpoint's metadata (``calibration``), so the predictor,
the served runtimes and the exports all apply it.

The expected calibration error (ECE) is the gap between confidence and accuracy, averaged over equal-width
confidence bins weighted by their share of images; the bins themselves are the reliability diagram.

The threshold: predict answers ``unknown`` when the top calibrated probability is below it. It is chosen on
the validation split as the lowest confidence at which the answers given still reach ``target_precision``
(default 0.95: at most one answer in twenty wrong), which answers as many images as that precision allows.
When even the most confident answers miss the target, no threshold is chosen (``None``) and every image is
answered; a user can set one either way. A validation split of fewer than ``MIN_IMAGES`` images is too small
to fit either: the model keeps ``T = 1`` and no threshold.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_TARGET_PRECISION = 0.95
# Fewer validation images than this say too little for a temperature or a 95%-precision threshold (one image
# is more than 3 points of precision): the model is left uncalibrated.
MIN_IMAGES = 30
ECE_BINS = 15
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.1, 20.0
# Thresholds at which the coverage/accuracy trade-off is drawn.
COVERAGE_THRESHOLDS = (*(round(i / 20, 2) for i in range(20)), 0.97, 0.99)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)``. Optimised in log space, so ``T`` stays
    positive, and clamped to a sane range. 1.0 (no scaling) without images or when every image is
    classified correctly: the NLL then keeps falling as ``T`` shrinks, and the fit would claim certainty."""
    if logits.numel() == 0 or len(labels) == 0 or bool((logits.argmax(1) == labels).all()):
        # Without a single wrong answer the NLL falls as T shrinks, towards 0: nothing to calibrate against.
        return 1.0
    logits = logits.detach().float().cpu().clone()  # a normal tensor (evaluation makes inference tensors)
    labels = labels.detach().cpu().clone()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, MIN_TEMPERATURE), MAX_TEMPERATURE)


def calibrated(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities: ``softmax(logits / T)``."""
    return torch.softmax(logits.float() / temperature, dim=1)


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE and the reliability diagram: per equal-width confidence bin, its images, mean confidence and
    accuracy (bins without images are listed with a count of 0)."""
    n = len(labels)
    if n == 0:
        return {"ece": None, "bins": []}
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 cannot occur (max of a softmax).
    index = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1
    out: list[dict[str, Any]] = []
    ece = 0.0
    for i in range(bins):
        mask = index == i
        count = int(mask.sum())
        entry: dict[str, Any] = {"lower": i / bins, "upper": (i + 1) / bins, "count": count}
        if count:
            conf = float(confidence[mask].double().mean())
            acc = float(correct[mask].mean())
            entry.update(confidence=conf, accuracy=acc)
            ece += abs(acc - conf) * count / n
        out.append(entry)
    return {"ece": ece, "bins": out}


def coverage_curve(probs: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    """At each threshold: the share of images answered (top probability at or above it) and the accuracy
    of those answers (None when none is answered)."""
    n = len(labels)
    if n == 0:
        return []
    confidence, predicted = probs.max(1)
    correct = predicted == labels
    points = []
    for t in COVERAGE_THRESHOLDS:
        answered = confidence >= t
        k = int(answered.sum())
        points.append(
            {
                "threshold": t,
                "coverage": k / n,
                "accuracy": float(correct[answered].double().mean()) if k else None,
            }
        )
    return points


def choose_threshold(
    probs: torch.Tensor, labels: torch.Tensor, target_precision: float = DEFAULT_TARGET_PRECISION
) -> float | None:
    """The lowest threshold whose answers (top probability at or above it) reach ``target_precision``;
    0.0 when every answer together does; None when no threshold does."""
    n = len(labels)
    if n == 0:
        return None
    confidence, predicted = probs.max(1)
    order = confidence.argsort(descending=True)
    conf = confidence[order].double()
    correct = (predicted[order] == labels[order]).double()
    precision = correct.cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64)
    # A cut is possible only between different confidences (a threshold answers every tie alike).
    boundary = torch.ones(n, dtype=torch.bool)
    boundary[:-1] = conf[:-1] > conf[1:]
    ok = (precision >= target_precision - 1e-12) & boundary
    if not bool(ok.any()):
        return None
    last = int(ok.nonzero().max())
    return 0.0 if last == n - 1 else float(conf[last])


def split_summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, Any]:
    """One split before and after scaling: NLL, ECE and both reliability diagrams."""
    before = reliability(calibrated(logits, 1.0), labels)
    after = reliability(calibrated(logits, temperature), labels)
    return {
        "count": len(labels),
        "nll_before": F.cross_entropy(logits.float(), labels).item(),
        "nll_after": F.cross_entropy(logits.float() / temperature, labels).item(),
        "ece_before": before["ece"],
        "ece_after": after["ece"],
        "reliability_before": before["bins"],
        "reliability_after": after["bins"],
    }


def calibrate(
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]], target_precision: float = DEFAULT_TARGET_PRECISION
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit on ``splits["val"]`` (logits, labels); returns (what the checkpoint keeps, the report for the
    evaluation: per split ECE before/after with reliability bins, and the validation coverage curve).

    With fewer than ``MIN_IMAGES`` validation images (or a diverged network) nothing is fitted: the
    temperature stays 1, no threshold is chosen, and the report's ``note`` says why."""
    val_logits, val_labels = splits["val"]
    finite = {name: bool(torch.isfinite(logits).all()) for name, (logits, _) in splits.items()}
    note = None
    if not finite["val"]:  # nothing sensible to fit (and NaN is not JSON for a database)
        note = "not calibrated: the network's validation outputs are not finite"
    elif len(val_labels) < MIN_IMAGES:
        note = f"not calibrated: {len(val_labels)} validation images are too few (at least {MIN_IMAGES} are needed)"
    temperature = fit_temperature(val_logits, val_labels) if note is None else 1.0
    val_probs = calibrated(val_logits, temperature)
    meta: dict[str, Any] = {
        "temperature": temperature,
        "threshold": choose_threshold(val_probs, val_labels, target_precision) if note is None else None,
        "target_precision": target_precision,
        "fitted_on": "val" if note is None else None,
        "images": len(val_labels),
    }
    report: dict[str, Any] = {**meta, "bins": ECE_BINS, "note": note}
    if finite["val"]:
        report["coverage"] = coverage_curve(val_probs, val_labels)
    for name, (logits, labels) in splits.items():
        if len(labels) and finite[name]:
            report[name] = split_summary(logits, labels, temperature)
    return meta, report
