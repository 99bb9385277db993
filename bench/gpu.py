"""The GPU benchmark (``bench/gpu.sh``): training and prediction throughput on one CUDA device.

Needs only torch, torchvision, numpy and Pillow (no service dependencies, no network): images are
generated, weights are random. For resnet18, resnet50, alexnet and googlenet at 224 px it measures

- ours: the engine's data path (decode-once pixel cache, batched crop/flip/normalise on the GPU) and its
  training step (bf16 autocast, channels-last, fused AdamW; torch.compile when it pays), images/s;
- tutorial: ImageFolder + PIL transforms + DataLoader(batch 4, 4 workers) + SGD, fp32, images/s;
- MFU from torchvision's published operation counts (training ~ 3x the forward GFLOPs);
- prediction throughput (bf16, channels-last, batch 256);
- the serving half: what the predict endpoint runs per forward pass (uint8 crops copied from pinned memory,
  normalisation, network, softmax: ``finetune.export.ServingNetwork``) at batch 1 / 8 / 64 / 256, in float32,
  bf16 and bf16 + torch.compile, and in ONNX Runtime's CUDA and TensorRT providers where ``onnxruntime-gpu``
  is installed (otherwise those rows say why they are missing).

    python -m bench.gpu [--seconds 20] [--archs resnet18,resnet50,alexnet,googlenet] [--out bench/out/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# Modules this script may import beyond the standard library: what a bare CUDA machine has (tested by
# tests/test_bench_gpu_smoke.py, which runs it on the CPU with everything else hidden).
ALLOWED_DISTRIBUTIONS = ("torch", "torchvision", "numpy", "pillow")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def amp(device: torch.device) -> Any:
    """bf16 autocast on CUDA; on a CPU (the smoke check) fp32, which is faster there."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# Dense bf16 peak of the cards we are likely to meet (tensor cores, no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def make_images(root: Path, n: int, classes: int = 10) -> Path:
    """``root/train/<class>/*.jpg`` of 400x300 photos (decoded once into the pixel cache by our arm)."""
    from bench.data import SHAPES, make_photo

    rng = random.Random(0)
    for i in range(n):
        shape = SHAPES[i % min(classes, len(SHAPES))]
        folder = root / "train" / f"{shape}{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(make_photo(shape, rng))
    return root


def ours(
    arch: str,
    data: Path,
    cache: Path,
    device: torch.device,
    *,
    batch: int,
    seconds: float,
    compile_model: bool,
    warmup: int = 15,
) -> dict[str, Any]:
    from finetune.dataset import DatasetOptions
    from finetune.datastore import load_into_store
    from finetune.loader import TrainAugment, batches
    from finetune.models import build_model, forward_logits

    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    built = build_model(arch, len(classes), "none")
    prep = built.preprocessing
    # The engine's own data path: every image checked and decoded once into the pixel store, then read
    # from its memory-mapped shards. All of train/ is trained on, as the tutorial arm does: no split drawn
    # (evaluate_only puts every usable image in one split, "test").
    stored = load_into_store(
        data / "train", cache_root=cache, tier=prep.tier, options=DatasetOptions(evaluate_only=True)
    )
    images = stored.splits["test"]
    model = built.model.to(device).to(memory_format=torch.channels_last).train()
    step_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    augment = TrainAugment(prep, device, channels_last=True)
    gen = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with amp(device):
            logits, aux = forward_logits(step_model, x)  # type: ignore[arg-type]
            loss = F.cross_entropy(logits, y) + 0.3 * sum(
                (F.cross_entropy(a, y) for a in aux), torch.zeros((), device=device)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warm = 0
    n = 0
    start = None
    while True:
        for x, y in augment.batches(images, batches(len(images), batch, generator=gen, drop_last=True), gen):
            step(x, y)
            if warm < warmup:  # compile, cudnn autotune, allocator warm-up
                warm += 1
                if warm == warmup:
                    sync(device)
                    start = time.perf_counter()
                continue
            n += batch
            if start is not None and time.perf_counter() - start > seconds:
                sync(device)
                elapsed = time.perf_counter() - start
                return {"images_per_sec": n / elapsed, "batch": batch, "compiled": compile_model}


def tutorial(arch: str, data: Path, device: torch.device, *, seconds: float, warmup: int = 10) -> dict[str, Any]:
    from torchvision import datasets

    from bench.reference import build_reference_model, tutorial_transforms

    ds = datasets.ImageFolder(str(data / "train"), tutorial_transforms(224)["train"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=4)
    model = build_reference_model(arch, len(ds.classes), None).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    n, start, warm = 0, None, 0
    while True:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            out = model(x)
            out = out.logits if hasattr(out, "logits") else out
            F.cross_entropy(out, y).backward()
            opt.step()
            if warm < warmup:
                warm += 1
                if warm == warmup:
                    sync(device)
                    start = time.perf_counter()
                continue
            n += x.shape[0]
            if start is not None and time.perf_counter() - start > seconds:
                sync(device)
                return {"images_per_sec": n / (time.perf_counter() - start)}


@torch.inference_mode()
def predict(arch: str, device: torch.device, *, batch: int = 256, seconds: float = 5.0) -> dict[str, Any]:
    from finetune.models import build_model

    model = build_model(arch, 10, "none").model.to(device).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    for _ in range(5 if device.type == "cuda" else 1):
        with amp(device):
            model(x)
    sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with amp(device):
            model(x)
        n += batch
    sync(device)
    return {"images_per_sec": n / (time.perf_counter() - start), "batch": batch}


SERVING_BATCHES = (1, 8, 64, 256)


def _rate(step: Any, batch: int, device: torch.device, seconds: float, warmup: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += batch
    sync(device)
    return n / (time.perf_counter() - start)


def serving_half(
    arch: str, device: torch.device, *, batches: tuple[int, ...], seconds: float, try_compile: bool
) -> dict[str, Any]:
    """Images/s of the serving forward pass per batch size and runtime (see the module's docstring)."""
    from finetune.export import ServingNetwork, static_pools
    from finetune.models import build_model, inference_model

    built = build_model(arch, 10, "none")
    crop = built.preprocessing.crop_size
    network = static_pools(inference_model(built.model), crop)
    net = ServingNetwork(network, built.preprocessing).eval()
    warmup = 5 if device.type == "cuda" else 1
    out: dict[str, Any] = {"crop": crop, "torch": {}, "onnxruntime": {}}
    variants: dict[str, tuple[Any, bool]] = {"fp32": (net.to(device).to(memory_format=torch.channels_last), False)}
    if device.type == "cuda":
        variants["bf16"] = (variants["fp32"][0], True)
        if try_compile:
            # One compile for every batch size (a static compile would recompile for each of them).
            variants["bf16+compile"] = (torch.compile(variants["fp32"][0], dynamic=True), True)
    for name, (module, bf16) in variants.items():
        rates: dict[str, float] = {}
        for batch in batches:
            host = torch.randint(0, 256, (batch, crop, crop, 3), dtype=torch.uint8)
            if device.type == "cuda":
                host = host.pin_memory()

            @torch.inference_mode()
            def step(host: torch.Tensor = host, module: Any = module, bf16: bool = bf16) -> None:
                x = host.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    module(x)[0].float().cpu()  # the probabilities come back to the host, as in serving

            try:
                rates[str(batch)] = _rate(step, batch, device, seconds, warmup)
            except Exception as e:  # compile support varies by build: the other rows still stand
                out["torch"][f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
                break
        out["torch"][name] = rates
    out["onnxruntime"] = _ort_serving(net.cpu(), crop, device, batches=batches, seconds=seconds, warmup=warmup)
    return out


def _ort_serving(
    net: Any, crop: int, device: torch.device, *, batches: tuple[int, ...], seconds: float, warmup: int
) -> dict[str, Any]:
    """ONNX Runtime's CUDA and TensorRT providers on the same graph, when onnxruntime-gpu is installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed (pip install onnxruntime-gpu for its CUDA/TensorRT rows)"}
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    if device.type != "cuda":
        wanted = {"cpu": "CPUExecutionProvider"}
    available = set(ort.get_available_providers())
    path = Path(tempfile.mkdtemp(prefix="gpu-serving-")) / "model.onnx"
    example = torch.zeros(2, crop, crop, 3, dtype=torch.uint8)
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["probabilities", "logits"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
    out: dict[str, Any] = {}
    for name, provider in wanted.items():
        if provider not in available:
            out[name] = {"skipped": f"{provider} is not in this onnxruntime build ({sorted(available)})"}
            continue
        options: list[Any] = [provider]
        if name == "tensorrt":
            options = [(provider, {"trt_fp16_enable": True}), "CUDAExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), providers=options)
            rates: dict[str, float] = {}
            for batch in batches:
                x = torch.randint(0, 256, (batch, crop, crop, 3), dtype=torch.uint8).numpy()

                def step(x: Any = x, session: Any = session) -> None:
                    session.run(["probabilities"], {"image": x})

                rates[str(batch)] = _rate(step, batch, torch.device("cpu"), seconds, warmup)
            out[name] = rates
        except Exception as e:  # a provider that fails to start (driver, TensorRT libraries) skips its row
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--archs", default="resnet18,resnet50,alexnet,googlenet")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu.json"))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--batch", type=int, help="one batch size for every architecture (default: tuned per arch)")
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke check of the script, not a benchmark"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    from torchvision.models import get_model_weights

    device = torch.device(args.device)
    warmups = {"ours": 15, "tutorial": 10} if device.type == "cuda" else {"ours": 1, "tutorial": 1}
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke check)"
    peak = peak_tflops(name)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    t0 = time.perf_counter()
    data = make_images(work / "data", args.images)
    print(f"{name}: generated {args.images} images in {time.perf_counter() - t0:.0f}s", flush=True)
    batches = {"resnet18": 256, "resnet50": 256, "alexnet": 512, "googlenet": 256}
    if args.batch:
        batches = dict.fromkeys(batches, args.batch)
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak, "archs": {}}
    for arch in args.archs.split(","):
        gflops = float(get_model_weights(arch).DEFAULT.meta["_ops"])  # forward, one 224 px image
        row: dict[str, Any] = {"forward_gflops": gflops}

        def run_ours(compile_model: bool, arch: str = arch) -> dict[str, Any]:
            return ours(
                arch,
                data,
                work / "cache",
                device,
                batch=batches[arch],
                seconds=args.seconds,
                compile_model=compile_model,
                warmup=warmups["ours"],
            )

        eager = run_ours(compile_model=False)
        row["ours_eager"] = eager
        best = eager
        if not args.no_compile:
            try:
                compiled = run_ours(compile_model=True)
                row["ours_compiled"] = compiled
                if compiled["images_per_sec"] > best["images_per_sec"]:
                    best = compiled
            except Exception as e:  # compile support varies by build: eager figures still stand
                row["compile_error"] = f"{type(e).__name__}: {e}"[:300]
        row["ours"] = best
        row["tutorial"] = tutorial(arch, data, device, seconds=min(args.seconds, 15), warmup=warmups["tutorial"])
        row["ratio"] = best["images_per_sec"] / row["tutorial"]["images_per_sec"]
        if peak:
            row["mfu"] = best["images_per_sec"] * 3 * gflops * 1e9 / (peak * 1e12)
        row["predict"] = predict(arch, device, batch=args.batch or 256, seconds=min(args.seconds, 5.0))
        row["serving"] = serving_half(
            arch,
            device,
            batches=(args.batch,) if args.batch else SERVING_BATCHES,
            seconds=min(args.seconds, 1.5),
            try_compile=not args.no_compile,
        )
        results["archs"][arch] = row
        print(
            f"{arch}: ours {best['images_per_sec']:.0f} img/s (compiled={best['compiled']}), tutorial "
            f"{row['tutorial']['images_per_sec']:.0f} img/s, {row['ratio']:.1f}x, MFU {row.get('mfu', float('nan')):.1%}, "
            f"predict {row['predict']['images_per_sec']:.0f} img/s; serving {row['serving']['torch']}, "
            f"ONNX Runtime {row['serving']['onnxruntime']}",
            flush=True,
        )
    results["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
