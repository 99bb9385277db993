"""Serving runtimes: the fastest way this host has to turn a batch of uint8 crops into probabilities.

Candidates for one model on one device:

- ``torch-eager``: the predictor's network in the default (contiguous) memory layout;
- ``torch-channels-last``: the same network in channels-last layout (the predictor's default);
- ``torch-compile``: channels-last under ``torch.compile`` (only when asked: compiling takes ~20 s);
- ``onnxruntime``: the run's ONNX export (parity-checked, ``finetune.export``) in ONNX Runtime, on a CPU,
  when the ``onnxruntime`` package is installed; ``onnxruntime-int8`` when the model is set to int8.

``select_runtime`` measures the candidates at the serving batch size, keeps the fastest, and records every
figure in ``RUN/serving.json`` per device, so the next process on the same kind of host reuses the choice
without measuring again. The PyTorch path is always there: on a GPU, and whenever ONNX Runtime is missing
or an export cannot be made.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write_json
from .errors import FinetuneError
from .export import (
    ONNX,
    ONNX_INT8,
    ExportError,
    ProbabilityFn,
    checkpoint_identity,
    export_run,
    onnx_available,
    onnx_probabilities,
    onnx_session,
)
from .loader import Normalizer

log = logging.getLogger(__name__)

SERVING_FILE = "serving.json"
PRECISIONS = ("fp32", "int8")
TORCH_EAGER, TORCH_CHANNELS_LAST, TORCH_COMPILE = "torch-eager", "torch-channels-last", "torch-compile"
ORT, ORT_INT8 = "onnxruntime", "onnxruntime-int8"


@dataclass
class Runtime:
    """One way to run the model: uint8 (N, H, W, 3) -> float32 probabilities (N, C). ``narrow``, where there
    is one, is the same model on a share of the threads, for passes that run side by side under load
    (``lanes`` of them: see ``app.serving.batcher``)."""

    name: str
    precision: str
    run: ProbabilityFn
    narrow: ProbabilityFn | None = None
    lanes: int = 1

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)


@dataclass
class Choice:
    """The runtime in use, and what the measurement that chose it found."""

    runtime: Runtime
    measured: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


# What decides a CPU's speed at these networks, beyond its name (a hypervisor may name it only "Processor")
VECTOR_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """The CPU's model name and which of ``VECTOR_FEATURES`` it has (from Linux's ``cpuinfo``; elsewhere the
    platform's name and no features)."""
    name, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, [f for f in VECTOR_FEATURES if f in flags]


def device_key(device: torch.device) -> str:
    """What a measurement is valid for: the accelerator's name, or the CPU model and usable cores."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_description()[0]}:{usable_cpus()} cores"


# -- the candidates ----------------------------------------------------------------------------------------
def torch_runtime(predictor: Any, name: str) -> Runtime:
    """The predictor's network as ``name`` (eager, channels-last or compiled), with its normalisation."""
    channels_last = name != TORCH_EAGER
    model = predictor.model
    if not channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    if name == TORCH_COMPILE:
        model = torch.compile(model)
    device = predictor.device
    normalize = Normalizer(predictor.preprocessing, device, channels_last)
    temperature = predictor.temperature  # calibrated, as the predictor and the exports answer

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        x = normalize(torch.from_numpy(batch).to(device, non_blocking=True))
        with predictor.autocast():
            logits = model(x)
        return torch.softmax(logits.float() / temperature, dim=1).cpu().numpy()

    precision = "bf16" if predictor.amp_dtype is not None else "fp32"
    return Runtime(name, precision, run)


def ort_runtime(run_dir: Path, precision: str, predictor: Any, threads: int, lanes: int = 1) -> Runtime:
    """ONNX Runtime on the run's export (made and parity-checked now if it is not there yet); with ``lanes`` > 1
    also a narrow session of ``threads // lanes`` threads that that many passes share (ONNX Runtime runs one
    session from several threads at once)."""
    fmt = ONNX_INT8 if precision == "int8" else ONNX
    export = export_run(run_dir, fmt, predictor=_cpu_predictor(predictor, run_dir))
    onnx_session(export.path, threads=1)  # loads now: a damaged file is refused here, not at the first request
    lanes = max(1, min(lanes, threads))

    def session(width: int) -> ProbabilityFn:
        lock, made = threading.Lock(), list[ProbabilityFn]()

        def run(batch: np.ndarray) -> np.ndarray:
            # Made by the first call, on a thread that runs the forward passes: ONNX Runtime's worker threads
            # inherit that thread's priority (see app.serving.cache).
            with lock:
                if not made:
                    made.append(onnx_probabilities(onnx_session(export.path, threads=width)))
            return np.asarray(made[0](batch))

        return run

    narrow = session(threads // lanes) if lanes > 1 else None
    return Runtime(ORT_INT8 if precision == "int8" else ORT, precision, session(threads), narrow, lanes)


def _cpu_predictor(predictor: Any, run_dir: Path) -> Any:
    if predictor.device.type == "cpu":
        return predictor
    from .predict import Predictor

    return Predictor.from_run(run_dir, device="cpu")


def candidates(
    predictor: Any,
    run_dir: Path,
    precision: str,
    *,
    try_compile: bool,
    use_onnx: bool,
    threads: int | None = None,
    lanes: int = 1,
) -> tuple[list[Runtime], str]:
    """The runtimes to measure, and a note on what was left out and why."""
    notes: list[str] = []
    ort: list[Runtime] = []
    if predictor.device.type == "cpu" and use_onnx:
        if onnx_available():
            try:
                ort.append(ort_runtime(run_dir, precision, predictor, threads or usable_cpus(), lanes))
            except (ExportError, FinetuneError) as e:
                notes.append(f"ONNX Runtime not used: {e}")
                log.warning("model %s: ONNX Runtime not used: %s", run_dir.name, e)
        else:
            notes.append("ONNX Runtime is not installed: serving with PyTorch")
    if precision == "int8":
        if ort:
            return ort, "; ".join(notes)
        notes.append("int8 needs ONNX Runtime on a CPU: serving float32 with PyTorch")
    names = [TORCH_CHANNELS_LAST, TORCH_EAGER] + ([TORCH_COMPILE] if try_compile else [])
    return [torch_runtime(predictor, n) for n in names] + ort, "; ".join(notes)


# -- measuring and choosing --------------------------------------------------------------------------------
def images_per_sec(runtime: Runtime, batch: np.ndarray, seconds: float, warmup: int = 2) -> float:
    for _ in range(warmup):  # compile, allocator, ORT's first-run planning
        runtime(batch)
    n, start = 0, time.perf_counter()
    while True:
        runtime(batch)
        n += len(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def measure(options: Sequence[Runtime], batch: np.ndarray, seconds: float, rounds: int = 3) -> dict[str, float]:
    """Images/s of each runtime: ``rounds`` interleaved rounds (A B C A B C ...) of ``seconds / rounds`` each,
    the best round kept. On a shared machine a burst of someone else's work then costs a round, not the
    verdict."""
    best: dict[str, float] = {}
    for r in range(rounds):
        for runtime in options:
            if r > 0 and runtime.name not in best:
                continue  # it failed in the first round
            try:
                speed = images_per_sec(runtime, batch, seconds / rounds, warmup=2 if r == 0 else 0)
            except Exception as e:  # e.g. torch.compile without a compiler on this host: the others still run
                log.warning("runtime %s failed while measuring: %s", runtime.name, e)
                continue
            best[runtime.name] = max(best.get(runtime.name, 0.0), round(speed, 2))
    return best


def read_serving(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / SERVING_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def recorded(run_dir: Path, identity: dict[str, Any], key: str, precision: str) -> dict[str, Any] | None:
    data = read_serving(run_dir)
    if data.get("checkpoint") != identity:
        return None
    entry = ((data.get("devices") or {}).get(key) or {}).get(precision)
    return entry if isinstance(entry, dict) else None


def record(run_dir: Path, identity: dict[str, Any], key: str, precision: str, entry: dict[str, Any]) -> None:
    data = read_serving(run_dir)
    if data.get("checkpoint") != identity:
        data = {"checkpoint": identity, "devices": {}}
    data.setdefault("devices", {}).setdefault(key, {})[precision] = entry
    atomic_write_json(run_dir / SERVING_FILE, data)


@dataclass
class Prepared:
    """The candidates for one model (exports made), before measuring."""

    run_dir: Path
    crop: int
    precision: str
    options: list[Runtime]
    note: str
    identity: dict[str, Any]
    key: str
    previous: dict[str, Any] | None
    remeasure: bool = False


def prepare(
    predictor: Any,
    run_dir: str | Path,
    *,
    precision: str = "fp32",
    try_compile: bool = False,
    use_onnx: bool = True,
    remeasure: bool = False,
    threads: int | None = None,
    lanes: int = 1,
) -> Prepared:
    """The slow half of choosing (exports and their parity checks): safe to run beside serving."""
    run_dir = Path(run_dir)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    options, note = candidates(
        predictor, run_dir, precision, try_compile=try_compile, use_onnx=use_onnx, threads=threads, lanes=lanes
    )
    identity = checkpoint_identity(run_dir)
    key = device_key(predictor.device)
    previous = None if remeasure else recorded(run_dir, identity, key, precision)
    return Prepared(
        run_dir, predictor.preprocessing.crop_size, precision, options, note, identity, key, previous, remeasure
    )


def choose(prepared: Prepared, *, batch: int = 8, seconds: float = 1.5) -> Choice:
    """The fastest candidate at ``batch`` images per forward: the recorded choice for this checkpoint,
    device and precision when there is one, else measured now (run it where nothing else competes for the
    cores, e.g. on the forward thread) and recorded."""
    p = prepared
    by_name = {r.name: r for r in p.options}
    if p.previous is not None and p.previous.get("winner") in by_name:
        return Choice(by_name[p.previous["winner"]], p.previous, p.note)
    if len(p.options) == 1 and not p.remeasure:  # nothing to choose between (measured only when asked)
        return Choice(p.options[0], {"winner": p.options[0].name, "images_per_sec": {}}, p.note)
    sample = np.random.default_rng(0).integers(0, 256, (batch, p.crop, p.crop, 3), dtype=np.uint8)
    speeds = measure(p.options, sample, seconds)
    if not speeds:
        raise FinetuneError("no runtime could run this model")
    winner = max(speeds, key=lambda n: speeds[n])
    entry = {
        "winner": winner,
        "images_per_sec": speeds,
        "batch": batch,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    try:
        record(p.run_dir, p.identity, p.key, p.precision, entry)
    except OSError as e:  # a read-only or removed run folder: the choice still holds for this process
        log.warning("model %s: serving choice not recorded: %s", p.run_dir.name, e)
    log.info("model %s on %s (%s): %s at %s", p.run_dir.name, p.key, p.precision, winner, speeds)
    return Choice(by_name[winner], entry, p.note)


def select_runtime(
    predictor: Any,
    run_dir: str | Path,
    *,
    precision: str = "fp32",
    batch: int = 8,
    seconds: float = 1.5,
    try_compile: bool = False,
    use_onnx: bool = True,
    remeasure: bool = False,
) -> Choice:
    """``prepare`` then ``choose`` in the calling thread."""
    prepared = prepare(
        predictor, run_dir, precision=precision, try_compile=try_compile, use_onnx=use_onnx, remeasure=remeasure
    )
    return choose(prepared, batch=batch, seconds=seconds)


class BatchBuffer:
    """A preallocated uint8 batch the crops are copied into (no new array per forward pass)."""

    def __init__(self, crop: int, capacity: int) -> None:
        self.array = np.empty((max(1, capacity), crop, crop, 3), dtype=np.uint8)

    def fill(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        n = len(crops)
        out = self.array[:n] if n <= len(self.array) else np.empty((n, *self.array.shape[1:]), dtype=np.uint8)
        for i, c in enumerate(crops):
            out[i] = c
        return out


def batch_forward(runtime: Runtime, crop: int, capacity: int) -> Callable[[Sequence[np.ndarray], bool], torch.Tensor]:
    """The batcher's forward: crops into a preallocated buffer (one per thread: passes may run side by side),
    probabilities out as a tensor; ``beside`` picks the runtime's narrow form where it has one."""
    buffers = threading.local()

    def forward(crops: Sequence[np.ndarray], beside: bool = False) -> torch.Tensor:
        buffer = getattr(buffers, "buffer", None)
        if buffer is None:
            buffer = buffers.buffer = BatchBuffer(crop, capacity)
        run = runtime.narrow if beside and runtime.narrow is not None else runtime.run
        return torch.from_numpy(np.ascontiguousarray(run(buffer.fill(crops))))

    return forward
