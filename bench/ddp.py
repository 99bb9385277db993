"""The multi-GPU section of ``bench/gpu.sh``: data-parallel training throughput on 1, 2, 4, 8 ranks.

One rank per GPU under torchrun (``python -m torch.distributed.run --standalone --nproc-per-node N -m
bench.ddp``): resnet50 at 224 px, bf16 autocast, channels-last, fused AdamW, wrapped in
DistributedDataParallel exactly as the engine wraps it (``finetune.train``), gradients all-reduced over
NCCL every step. The batches are random tensors already on each GPU, so the figure is the training step's
own scaling (compute + all-reduce), not the data path (``bench/gpu.py`` measures that on one card).

Rank 0 writes ``{"ranks", "images_per_sec", ...}`` to ``--out``; ``--summary`` folds several such files
into images/s and scaling efficiency (N-rank images/s / (N x 1-rank images/s)).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m bench.ddp --out bench/out/ddp-2.json
    python -m bench.ddp --summary bench/out/ddp-*.json
    # no GPU (a check of the script, not a benchmark): --device cpu --arch resnet18 --image-size 64 --batch 2

Needs only torch and torchvision (like bench/gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from torchvision.models import get_model

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        torch.backends.cudnn.benchmark = True
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    torch.manual_seed(0)
    model = get_model(args.arch, weights=None, num_classes=1000).to(device, memory_format=torch.channels_last)
    step_model: Any = DDP(model, device_ids=[local] if cuda else None) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=cuda)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(step_model(x), y)
        loss.backward()  # DDP all-reduces the gradients here, overlapped with the backward pass
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    if world > 1:
        dist.barrier()
    steps, t0 = 0, time.perf_counter()
    while steps < args.steps or (args.seconds and time.perf_counter() - t0 < args.seconds):
        step()
        steps += 1
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if world > 1:  # the slowest rank sets the pace
        t = torch.tensor([elapsed], dtype=torch.float64, device=device if cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        elapsed = float(t.item())
        dist.destroy_process_group()
    name = torch.cuda.get_device_name(local) if cuda else "cpu (smoke check)"
    return {
        "ranks": world,
        "rank": rank,
        "device": name,
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_per_rank": args.batch,
        "global_batch": args.batch * world,
        "steps": steps,
        "seconds": elapsed,
        "images_per_sec": steps * args.batch * world / elapsed,
        "precision": "bf16" if cuda else "fp32",
        "channels_last": True,
    }


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """images/s and scaling efficiency per rank count (against the 1-rank run, when there is one)."""
    rows = sorted(rows, key=lambda r: r["ranks"])
    one = next((r["images_per_sec"] for r in rows if r["ranks"] == 1), None)
    return [
        {
            "ranks": r["ranks"],
            "images_per_sec": r["images_per_sec"],
            "scaling_efficiency": r["images_per_sec"] / (r["ranks"] * one) if one else None,
        }
        for r in rows
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="images per rank per step")
    p.add_argument("--seconds", type=float, default=15.0, help="measure at least this long")
    p.add_argument("--steps", type=int, default=3, help="and at least this many steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", type=Path)
    p.add_argument("--summary", nargs="+", type=Path, metavar="JSON", help="fold these results and print them")
    args = p.parse_args(argv)
    if args.summary:
        table = summary([json.loads(path.read_text()) for path in args.summary])
        for row in table:
            eff = row["scaling_efficiency"]
            print(
                f"{row['ranks']} rank(s): {row['images_per_sec']:.0f} img/s"
                + (f", efficiency {eff:.0%}" if eff else "")
            )
        print(json.dumps(table, indent=2))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the multi-GPU benchmark needs GPUs (skipped)", file=sys.stderr)
        return 2
    result = measure(args)
    if result["rank"] == 0:
        print(json.dumps(result), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
