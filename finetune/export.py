"""Export a trained run as one self-contained file (ONNX or TorchScript), checked against PyTorch.

The exported network takes what ``Predictor.preprocess`` returns — uint8 centre crops, (N, crop, crop, 3) —
and normalises them itself, so a client needs the file, Pillow and a runtime, nothing of ours::

    session = onnxruntime.InferenceSession("model.onnx")
    probs = session.run(["probabilities"], {"image": crops})[0]        # (N, classes), rows sum to 1
    meta = session.get_modelmeta().custom_metadata_map                  # class_names, preprocessing, ...

Class names, preprocessing (resize, crop, mean, std), the architecture and the checkpoint it came from are
in the file (ONNX ``metadata_props``, TorchScript extra file ``finetune.json``).

Every export is checked before it is kept: a fixed sample of the run's test split (at most
``PARITY_SAMPLE`` images) goes through the PyTorch predictor and through the export, and the top-1
agreement and largest absolute probability difference are recorded with the file in
``RUN/exports/exports.json``. A float32 export below 100 % / 1e-4 is refused. The int8 export (ONNX, static
quantization calibrated on the run's validation images) is judged by its accuracy change on the test split
instead: whether to serve it is the user's choice, made after seeing that figure.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import MODEL_FILE, atomic_write_json, load_checkpoint
from .errors import CheckpointError, FinetuneError, ImageError, InputError
from .models import Preprocessing

log = logging.getLogger(__name__)

ONNX, TORCHSCRIPT, ONNX_INT8 = "onnx", "torchscript", "onnx-int8"
FORMATS = (ONNX, TORCHSCRIPT, ONNX_INT8)
FILE_NAMES = {ONNX: "model.onnx", TORCHSCRIPT: "model.torchscript.pt", ONNX_INT8: "model.int8.onnx"}
EXPORT_DIR = "exports"
RECORD_FILE = "exports.json"
EXPORT_FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "logits")
METADATA_KEY = "finetune"  # the ONNX metadata entry / TorchScript extra file holding everything below
OPSET = 17
# A float32 export must agree with PyTorch on every image, to float rounding.
MIN_TOP1_AGREEMENT = 1.0
MAX_PROB_DIFF = 1e-4
PARITY_SAMPLE = 256  # test images checked (a fixed, evenly spaced sample of larger splits)
CALIBRATION_SAMPLE = 128  # validation images the int8 quantization is calibrated on
PARITY_BATCH = 32


class ExportError(FinetuneError):
    """An export cannot be made, or a stored one is corrupted or does not belong to this checkpoint."""

    code = "bad_export"


class ParityError(ExportError):
    """The export disagrees with PyTorch beyond the tolerance; ``parity`` holds the figures."""

    code = "export_parity_failed"

    def __init__(self, message: str, parity: dict[str, Any]) -> None:
        super().__init__(message)
        self.parity = parity


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return fmt


# -- the exported network ----------------------------------------------------------------------------------
class ServingNetwork(nn.Module):
    """uint8 crops (N, H, W, 3) -> (probabilities, logits): the predictor's normalisation, network and
    calibrated softmax (``softmax(logits / T)``, ``T`` from the checkpoint) as one graph. The normalisation
    is the same multiply-add as ``finetune.loader.Normalizer``; ``logits`` are the network's, unscaled."""

    scale: torch.Tensor
    shift: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, network: nn.Module, prep: Preprocessing, temperature: float = 1.0) -> None:
        super().__init__()
        std = torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.addcmul(self.shift, image.permute(0, 3, 1, 2).float(), self.scale)
        logits = self.network(x)
        return torch.softmax(logits / self.temperature, dim=1), logits


class StaticAdaptiveAvgPool(nn.Module):
    """``AdaptiveAvgPool2d`` for one known input size, as two matrix products with the pooling bins.

    ONNX has no adaptive pooling whose output size does not divide the input (LeNet's 6 -> 5, AlexNet's
    1 -> 6 at small crops); the bins of a fixed input size are a constant averaging matrix per axis."""

    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", _bins(in_hw[0], out_hw[0]))  # (out_h, in_h)
        self.register_buffer("cols", _bins(in_hw[1], out_hw[1]).t().contiguous())  # (in_w, out_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.rows, torch.matmul(x, self.cols))


def _bins(size: int, out: int) -> torch.Tensor:
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)  # floor and ceil, as torch computes them
        m[i, start:end] = 1.0 / (end - start)
    return m


def static_pools(network: nn.Module, crop: int) -> nn.Module:
    """A copy of ``network`` whose adaptive average pools are fixed for ``crop`` px input (see above)."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        module.register_forward_hook(
            lambda _m, args, _out, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:]))
        )
        for name, module in network.named_modules()
        if isinstance(module, nn.AdaptiveAvgPool2d)
    ]
    try:
        with torch.inference_mode():
            network(torch.zeros(1, 3, crop, crop))
    finally:
        for h in hooks:
            h.remove()
    network = copy.deepcopy(network)
    for name, in_hw in sizes.items():
        module = network.get_submodule(name)
        assert isinstance(module, nn.AdaptiveAvgPool2d)
        out_hw = _output_size(module.output_size, in_hw)
        if out_hw == (1, 1) or out_hw == in_hw:
            continue  # global pooling and identity export as they are
        parent, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent) if parent else network, child, StaticAdaptiveAvgPool(in_hw, out_hw))
    return network


def _output_size(out: Any, in_hw: tuple[int, int]) -> tuple[int, int]:
    if isinstance(out, int):
        return (out, out)
    h, w = out  # None keeps that side's input size
    return (in_hw[0] if h is None else int(h), in_hw[1] if w is None else int(w))


# -- parity ------------------------------------------------------------------------------------------------
ProbabilityFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> float32 (N, C)


@dataclass
class ParityImages:
    """Preprocessed crops with their labels (class index; -1 when unknown) and where they came from."""

    crops: np.ndarray  # uint8 (N, crop, crop, 3)
    labels: np.ndarray  # int64 (N,)
    source: str  # "test", "val", "train", "given" or "random"


def split_files(run_dir: Path, split: str, limit: int) -> list[tuple[Path, str]]:
    """(file, class name) of a run's ``split``, from ``dataset.json`` (the files and splits the run was
    trained with): a fixed, evenly spaced sample of at most ``limit``. The one place that knows where a
    run's images are: when the dataset moves to another store, only this changes."""
    try:
        report = json.loads((run_dir / "dataset.json").read_text())
        files = [f for f in report.get("files", []) if f.get("split") == split]
        root = Path(report["root"])
        if "root_from_run" in report and (run_dir / report["root_from_run"]).is_dir():
            root = run_dir / report["root_from_run"]  # wherever the data folder is mounted on this host
    except (OSError, ValueError, KeyError, TypeError):
        return []
    files.sort(key=lambda f: str(f["path"]))
    if len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return [(root / str(f.get("stored", f["path"])), str(f["class"])) for f in files]


def run_images(
    predictor: Any, run_dir: Path, splits: Sequence[str], limit: int, *, given: Sequence[Path] = ()
) -> ParityImages:
    """Crops for a check: the images the caller gives, else the first of ``splits`` whose files are still
    readable, else (the dataset is gone) ``limit`` fixed random crops, which still check the arithmetic."""
    crop = predictor.preprocessing.crop_size
    candidates: list[tuple[str, list[tuple[Path, str]]]] = (
        [("given", [(Path(p), "") for p in given])] if given else [(s, split_files(run_dir, s, limit)) for s in splits]
    )
    for source, files in candidates:
        crops, labels = [], []
        for path, name in files:
            try:
                crops.append(predictor.preprocess(path))
            except ImageError as e:  # a file removed or changed since training: check the others
                log.info("parity check skips %s: %s", path, e)
                continue
            labels.append(predictor.classes.index(name) if name in predictor.classes else -1)
        if crops:
            return ParityImages(np.stack(crops), np.asarray(labels, dtype=np.int64), source)
        if source == "given":
            raise InputError("none of the given images could be read")
    rng = np.random.default_rng(0)
    n = min(limit, 32)
    return ParityImages(rng.integers(0, 256, (n, crop, crop, 3), dtype=np.uint8), np.full(n, -1), "random")


def batched(fn: ProbabilityFn, crops: np.ndarray, batch: int = PARITY_BATCH) -> np.ndarray:
    return np.concatenate([fn(crops[i : i + batch]) for i in range(0, len(crops), batch)])


def compare(reference: np.ndarray, export: np.ndarray, labels: np.ndarray, source: str) -> dict[str, Any]:
    """Agreement of two (N, C) probability arrays, and each one's accuracy where labels are known."""
    agree = float((reference.argmax(1) == export.argmax(1)).mean())
    known = labels >= 0
    result: dict[str, Any] = {
        "split": source,
        "images": len(labels),
        "top1_agreement": agree,
        "max_abs_prob_diff": float(np.abs(reference - export).max()),
        "reference_top1": None,
        "export_top1": None,
        "accuracy_change_points": None,
    }
    if known.any():
        ref_acc = float((reference[known].argmax(1) == labels[known]).mean())
        exp_acc = float((export[known].argmax(1) == labels[known]).mean())
        result.update(
            reference_top1=ref_acc, export_top1=exp_acc, accuracy_change_points=round((exp_acc - ref_acc) * 100, 4)
        )
    return result


def torch_probabilities(predictor: Any) -> ProbabilityFn:
    """The PyTorch reference: the predictor's own forward (float32 on the CPU)."""

    def run(crops: np.ndarray) -> np.ndarray:
        return predictor.probabilities(list(crops)).numpy()

    return run


# -- writing the formats -----------------------------------------------------------------------------------
def serving_network(predictor: Any) -> ServingNetwork:
    """The predictor's network (batch norm already folded, eval mode) in contiguous layout, with fixed
    pools and the preprocessing in front, on the CPU."""
    network = copy.deepcopy(predictor.model).to("cpu", memory_format=torch.contiguous_format).eval()
    network = static_pools(network, predictor.preprocessing.crop_size)
    return ServingNetwork(network, predictor.preprocessing, predictor.temperature).eval()


# torch's tracing exporters keep their state in process globals (torch.onnx's GLOBALS.in_onnx_export, the
# JIT tracing state): two traces at once in one process (the service exporting one model while it loads
# another for serving) break each other. One trace at a time per process; the per-run file lock is for
# other processes.
_TRACING = threading.Lock()


# The tracing exporters warn that they are deprecated in favour of torch.export; they remain the fast,
# dependency-free path for these static convolutional networks (torch is pinned in pyproject). Those warnings
# are filtered once, here, by category and origin, rather than around each call with catch_warnings: that
# saves and restores one process-wide filter list, so a thread leaving it undid what another thread (FastAPI
# building a route, another export) had set meanwhile (CI: warnings that thread had silenced got through).
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\.")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
warnings.filterwarnings(
    "ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning
)


def write_onnx(predictor: Any, path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    net = serving_network(predictor)
    crop = predictor.preprocessing.crop_size
    example = torch.zeros(2, crop, crop, 3, dtype=torch.uint8)
    with _TRACING, torch.no_grad():
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
            opset_version=OPSET,
        )
    model = onnx.load(str(path))
    set_onnx_metadata(model, metadata)
    onnx.save(model, str(path))


def set_onnx_metadata(model: Any, metadata: dict[str, Any]) -> None:
    """Everything in one JSON entry, plus plain entries a generic tool shows (Netron, ORT's model meta)."""
    entries = {
        METADATA_KEY: json.dumps(metadata, sort_keys=True),
        "class_names": json.dumps(metadata["class_names"]),
        "preprocessing": json.dumps(metadata["preprocessing"]),
        "arch": metadata["arch"],
    }
    del model.metadata_props[:]
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    model.producer_name = "finetune"


def write_torchscript(predictor: Any, path: Path, metadata: dict[str, Any]) -> None:
    net = serving_network(predictor)
    crop = predictor.preprocessing.crop_size
    with _TRACING, torch.no_grad():
        traced = torch.jit.trace(net, torch.zeros(2, crop, crop, 3, dtype=torch.uint8))
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata, sort_keys=True)})


def write_int8(fp32_path: Path, path: Path, calibration: np.ndarray, metadata: dict[str, Any]) -> None:
    """Static QDQ quantization, weights per channel (int8), activations uint8, calibrated (min-max) on
    ``calibration`` crops. The input normalisation and the final softmax stay float."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calibration[i : i + 16] for i in range(0, len(calibration), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="int8-", dir=path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_float_nodes(onnx.load(str(prepared))),
        )
    model = onnx.load(str(path))
    set_onnx_metadata(model, metadata)
    onnx.save(model, str(path))


def _float_nodes(model: Any) -> list[str]:
    """Nodes kept in float: the preprocessing before the first convolution, and what follows the last
    matrix product (the softmax)."""
    nodes = list(model.graph.node)
    kinds = [n.op_type for n in nodes]
    first = next((i for i, k in enumerate(kinds) if k == "Conv"), 0)
    last = max((i for i, k in enumerate(kinds) if k in ("Gemm", "MatMul", "Conv")), default=len(nodes) - 1)
    return [n.name for n in nodes[:first] + nodes[last + 1 :]]


# -- loading -----------------------------------------------------------------------------------------------
def onnx_session(path: Path, *, threads: int | None = None, spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session. Without spinning, its threads sleep between batches instead of
    busy-waiting, leaving the cores to decoding and the event loop."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT reports a damaged file with its own exception types
        raise ExportError(f"{path.name} cannot be loaded by ONNX Runtime: {e}") from None


def onnx_probabilities(session: Any) -> ProbabilityFn:
    def run(crops: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([OUTPUT_NAMES[0]], {INPUT_NAME: crops})[0])

    return run


def torchscript_probabilities(path: Path) -> ProbabilityFn:
    module = torch.jit.load(str(path), map_location="cpu")

    def run(crops: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(crops)))[0].numpy()

    return run


def export_probabilities(fmt: str, path: Path, threads: int | None = None) -> ProbabilityFn:
    if fmt == TORCHSCRIPT:
        return torchscript_probabilities(path)
    return onnx_probabilities(onnx_session(path, threads=threads))


def read_metadata(fmt: str, path: Path) -> dict[str, Any]:
    """The ``finetune`` metadata stored in an export file."""
    try:
        if fmt == TORCHSCRIPT:
            extra = {f"{METADATA_KEY}.json": ""}
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            return dict(json.loads(extra[f"{METADATA_KEY}.json"]))
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        return dict(json.loads(props[METADATA_KEY]))
    except Exception as e:  # a damaged or foreign file, whatever the library raises for it
        raise ExportError(f"{path.name} is not a readable {fmt} export of this service: {e}") from None


# -- the run's exports -------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    format: str
    path: Path
    record: dict[str, Any]

    @property
    def parity(self) -> dict[str, Any]:
        return dict(self.record.get("parity") or {})


_hashes: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """The file's SHA-256, remembered per (path, size, modification time): checkpoints are immutable, and
    the model page asks for the current checkpoint's identity on every view."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        if len(_hashes) > 4096:
            _hashes.clear()
        _hashes[key] = _sha256(path)
    return _hashes[key]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_identity(run_dir: Path, checkpoint: str = "best") -> dict[str, Any]:
    ckpt = load_checkpoint(run_dir, checkpoint)
    return {"epoch": ckpt.epoch, "sha256": sha256_file(ckpt.path / MODEL_FILE)}


def export_metadata(predictor: Any, fmt: str, identity: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "format": fmt,
        "arch": predictor.arch,
        "class_names": list(predictor.classes),
        "preprocessing": predictor.preprocessing.to_dict(),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["batch", predictor.preprocessing.crop_size, predictor.preprocessing.crop_size, 3],
            "layout": "NHWC RGB: the image resized (short side to resize_size), centre-cropped to crop_size",
        },
        "outputs": list(OUTPUT_NAMES),
        "checkpoint": identity,
        # probabilities = softmax(logits / temperature); below threshold the service answers "unknown"
        "calibration": {"temperature": predictor.temperature, "threshold": predictor.threshold},
    }


def read_record(run_dir: Path) -> dict[str, Any]:
    """``RUN/exports/exports.json``: what was exported from which checkpoint, with each check's figures."""
    try:
        data = json.loads((run_dir / EXPORT_DIR / RECORD_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One export at a time per run (per host): two requests for the same file wait and share it."""
    folder = run_dir / EXPORT_DIR
    folder.mkdir(exist_ok=True)
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def verified_export(run_dir: Path, fmt: str, identity: dict[str, Any] | None = None) -> ExportResult:
    """A stored export that is whole and belongs to the run's current checkpoint, else ``ExportError``:
    its file's hash must match the record, and its metadata the checkpoint (classes, preprocessing, weights)."""
    check_format(fmt)
    identity = identity or checkpoint_identity(run_dir)
    record = read_record(run_dir)
    entry = (record.get("formats") or {}).get(fmt)
    if not entry or not entry.get("accepted"):
        raise ExportError(f"no accepted {fmt} export of this run")
    if record.get("checkpoint") != identity:
        raise ExportError(f"the {fmt} export was made from another checkpoint")
    path = run_dir / EXPORT_DIR / FILE_NAMES[fmt]
    if not path.is_file() or _sha256(path) != entry.get("sha256"):
        raise ExportError(f"the {fmt} export file is missing or corrupted (its hash does not match the record)")
    meta = read_metadata(fmt, path)
    ckpt_meta = load_checkpoint(run_dir).meta
    if (
        meta.get("checkpoint") != identity
        or meta.get("class_names") != list(ckpt_meta["class_names"])
        or meta.get("preprocessing") != _plain(Preprocessing.from_dict(ckpt_meta["preprocessing"]).to_dict())
        or _temperature(meta) != _temperature(ckpt_meta)
    ):
        raise ExportError(
            f"the {fmt} export does not match the model's checkpoint (classes, preprocessing, calibration or weights)"
        )
    return ExportResult(fmt, path, entry)


def _temperature(meta: dict[str, Any]) -> float:
    """The calibration temperature a checkpoint or an export's metadata records (1 before calibration)."""
    return float((meta.get("calibration") or {}).get("temperature") or 1.0)


def _plain(obj: Any) -> Any:
    """As read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


def export_run(
    run_dir: str | Path,
    fmt: str,
    *,
    images: Sequence[Path] = (),
    force: bool = False,
    predictor: Any = None,
) -> ExportResult:
    """The run's ``fmt`` export (made now, or the verified one already made from this checkpoint), with
    its parity record. Raises ``ParityError`` (and keeps no file) when a float32 export disagrees with
    PyTorch; ``images``: check on these files instead of the run's test split."""
    from .predict import Predictor

    run_dir = Path(run_dir)
    check_format(fmt)
    if fmt != TORCHSCRIPT:
        _require_onnx()
    checkpoint_identity(run_dir)  # a missing run or checkpoint is the caller's error, before anything is written
    with _run_lock(run_dir):
        identity = checkpoint_identity(run_dir)
        if not force and not images:
            try:
                return verified_export(run_dir, fmt, identity)
            except ExportError as e:
                log.info("exporting %s as %s: %s", run_dir.name, fmt, e)
        predictor = predictor or Predictor.from_run(run_dir, device="cpu")
        if predictor.device.type != "cpu":
            raise CheckpointError("exports are checked against the float32 CPU predictor: load it with device='cpu'")
        if fmt == ONNX_INT8:
            base = export_run_locked(run_dir, ONNX, identity, predictor, images, force=False)
            return _make(run_dir, fmt, identity, predictor, images, base=base.path)
        return export_run_locked(run_dir, fmt, identity, predictor, images, force=force)


def export_run_locked(
    run_dir: Path, fmt: str, identity: dict[str, Any], predictor: Any, images: Sequence[Path], *, force: bool
) -> ExportResult:
    if not force and not images:
        try:
            return verified_export(run_dir, fmt, identity)
        except ExportError:
            pass
    return _make(run_dir, fmt, identity, predictor, images)


def _make(
    run_dir: Path,
    fmt: str,
    identity: dict[str, Any],
    predictor: Any,
    images: Sequence[Path],
    base: Path | None = None,
) -> ExportResult:
    folder = run_dir / EXPORT_DIR
    final = folder / FILE_NAMES[fmt]
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    metadata = export_metadata(predictor, fmt, identity)
    check = run_images(predictor, run_dir, ("test", "val"), PARITY_SAMPLE, given=images)
    try:
        if fmt == ONNX:
            write_onnx(predictor, tmp, metadata)
        elif fmt == TORCHSCRIPT:
            write_torchscript(predictor, tmp, metadata)
        else:
            assert base is not None
            calibration = run_images(predictor, run_dir, ("val", "train"), CALIBRATION_SAMPLE)
            write_int8(base, tmp, calibration.crops, metadata)
        threads = max(1, torch.get_num_threads())
        parity = compare(
            batched(torch_probabilities(predictor), check.crops),
            batched(export_probabilities(fmt, tmp, threads), check.crops),
            check.labels,
            check.source,
        )
        float32 = fmt != ONNX_INT8
        parity["thresholds"] = (
            {"top1_agreement": MIN_TOP1_AGREEMENT, "max_abs_prob_diff": MAX_PROB_DIFF} if float32 else None
        )
        parity["passed"] = (
            parity["top1_agreement"] >= MIN_TOP1_AGREEMENT and parity["max_abs_prob_diff"] <= MAX_PROB_DIFF
            if float32
            else True
        )
        entry: dict[str, Any] = {
            "file": final.name,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "parity": parity,
            "accepted": parity["passed"],
        }
        if parity["passed"]:
            entry.update(sha256=_sha256(tmp), bytes=tmp.stat().st_size)
            os.replace(tmp, final)
        _record(run_dir, identity, fmt, entry)
    finally:
        tmp.unlink(missing_ok=True)
    if not parity["passed"]:
        raise ParityError(
            f"the {fmt} export disagrees with PyTorch on the {check.source} images (top-1 agreement "
            f"{parity['top1_agreement']:.2%}, max probability difference {parity['max_abs_prob_diff']:.2g}; "
            f"needed {MIN_TOP1_AGREEMENT:.0%} and {MAX_PROB_DIFF:g}): refused",
            parity,
        )
    return ExportResult(fmt, final, entry)


def _record(run_dir: Path, identity: dict[str, Any], fmt: str, entry: dict[str, Any]) -> None:
    record = read_record(run_dir)
    if record.get("checkpoint") != identity:  # a new best checkpoint: earlier exports no longer apply
        record = {"checkpoint": identity, "formats": {}}
    record.setdefault("formats", {})[fmt] = entry
    atomic_write_json(run_dir / EXPORT_DIR / RECORD_FILE, record)


def parity_summary(run_dir: Path) -> dict[str, Any]:
    """Per format, the recorded check of the current checkpoint's exports (for the model page and API)."""
    record = read_record(run_dir)
    try:
        current = checkpoint_identity(run_dir)
    except CheckpointError:
        return {}
    if record.get("checkpoint") != current:
        return {}
    return {fmt: {k: v for k, v in e.items() if k != "file"} for fmt, e in (record.get("formats") or {}).items()}


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _require_onnx() -> None:
    if not onnx_available():
        raise InputError("ONNX export needs the onnx and onnxruntime packages (pip install onnx onnxruntime)")
