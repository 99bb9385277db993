"""``python -m bench [all|full|frozen|pipeline|service|serving|quality] [--quick] [--data FOLDER]``

Writes ``bench/out/results.json`` and ``bench/RESULTS.md``. ``--data`` points the training and pipeline
benchmarks at your own ImageFolder-style folder (``train/<class>/...``, ``val/<class>/...``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine
from bench.report import write_markdown

OUT = ROOT / "bench" / "out"


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=("all", "full", "frozen", "pipeline", "service", "serving", "quality"),
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, not the speed")
    parser.add_argument("--data", type=Path, help="your own train/ val/ image folder instead of generated images")
    parser.add_argument("--repeats", type=int, help="repeats per benchmark (default 3, quick 1)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--no-torchserve", action="store_true", help="serving: leave TorchServe out (it needs Java and a pip install)"
    )
    parser.add_argument("--duration", type=float, help="serving: seconds per load cell (default 10, quick 2)")
    parser.add_argument(
        "--rounds",
        type=int,
        help="serving: windows each cell's seconds are split into, the servers taking turns (default 3, quick 1)",
    )
    parser.add_argument("--only", choices=("digits", "shapes"), help="quality: one dataset only")
    parser.add_argument(
        "--resnet18", action="store_true", help="quality: resnet18 from random initialisation too (slow on a CPU)"
    )
    args = parser.parse_args(argv)

    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    from bench.data import make_dataset

    if args.data:
        data = args.data
    elif quick:
        data = make_dataset(work / "data-quick", classes=3, train_per_class=16, val_per_class=6)
    else:
        data = make_dataset(work / "data", classes=4, train_per_class=100, val_per_class=25)
    results_path = args.out / ("results.quick.json" if quick else "results.json")
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["machine"] = machine()
    results["data"] = (
        str(data) if args.data else "generated: 4 shape classes, 100 train + 25 val per class, 400x300 JPEG"
    )
    started = time.perf_counter()
    which = args.which

    if which in ("all", "pipeline"):
        from bench.pipeline_bench import pipeline

        log("data pipeline")
        results["pipeline"] = pipeline(data, crop=64 if quick else 112, repeats=repeats, log=log)
    if which in ("all", "frozen"):
        from bench.train_bench import frozen

        log("frozen backbone")
        results["frozen"] = [
            frozen(data, work, "resnet18", epochs=2 if quick else 10, crop=64, repeats=repeats, log=log)
        ]
    if which in ("all", "full"):
        from bench.train_bench import full_finetune

        log("full fine-tuning")
        # AlexNet's arms take ~5x resnet18's on a CPU: two repeats keep `make bench` under 20 minutes.
        results["full"] = [
            full_finetune(data, work, arch, epochs=2 if quick else 6, crop=64, repeats=1 if quick else reps, log=log)
            for arch, reps in ((("resnet18", 1),) if quick else (("resnet18", repeats), ("alexnet", min(repeats, 2))))
        ]
    if which in ("all", "service"):
        from bench.service_bench import service

        log("service: ingest, startup, predict")
        results["service"] = service(
            work,
            ingest_images=200 if quick else 2000,
            durations=3 if quick else 15,
            concurrencies=(1, 8) if quick else (1, 8, 32),
            log=log,
        )
    if which == "serving":  # ~25 min with TorchServe and the backbones' pretraining: not part of `all`
        from bench.serving_bench import serving

        results["serving"] = serving(
            work,
            quick=quick,
            duration=args.duration or (2 if quick else 10),
            rounds=args.rounds or (1 if quick else 3),
            concurrencies=(1, 8) if quick else (1, 8, 32),
            torchserve=not args.no_torchserve and not quick,
            archs=("resnet18",) if quick else ("resnet18", "googlenet"),
            log=log,
        )
    if which == "quality":  # accuracy, not speed: its own section of RESULTS.md, the rest left as it is
        from bench.quality import quality
        from bench.report import write_quality_section

        done = results.get("quality", {}).get("datasets", {}) if args.only else {}
        results["quality"] = quality(work, quick=quick, log=log, only=args.only, resnet18=args.resnet18)
        results["quality"]["datasets"] = {**done, **results["quality"]["datasets"]}  # --only keeps the other
        results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        target = args.out / "RESULTS.quick.md" if quick else ROOT / "bench" / "RESULTS.md"
        results_path.write_text(json.dumps(results, indent=2, default=str))
        log(f"wrote {results_path} and {write_quality_section(results, target)}")
        return 0
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results.setdefault("seconds", {})[which] = time.perf_counter() - started
    results["quick"] = quick
    results_path.write_text(json.dumps(results, indent=2, default=str))
    # The repository's report only from the repository's results (a run into another folder reports there).
    if quick:
        target = args.out / "RESULTS.quick.md"
    else:
        target = ROOT / "bench" / "RESULTS.md" if args.out.resolve() == OUT.resolve() else args.out / "RESULTS.md"
    md = write_markdown(results, target)
    log(f"wrote {results_path} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
