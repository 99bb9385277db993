"""The ``finetune`` command line.

Exit codes: 0 ok, 2 bad input (dataset, settings, weights, arguments), 1 failure, 130 cancelled.
Heavy modules (torch) are imported inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from .config import TrainConfig, parse_rate
from .errors import Cancelled, InputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


# -- output ------------------------------------------------------------------------------------------------
class Output:
    """Human-readable lines (and a progress bar on a terminal) or, with --json, JSON on stdout."""

    def __init__(self, as_json: bool, stream: TextIO | None = None, err: TextIO | None = None) -> None:
        self.as_json = as_json
        # Looked up now, not at import: a caller (or a test) may have redirected sys.stdout since.
        self.stream = stream or sys.stdout
        self.err = err or sys.stderr
        self.tty = self.err.isatty()
        self._bar_open = False
        self._last_bar = 0.0

    def json(self, obj: Any) -> None:
        self.stream.write(json.dumps(obj, default=str) + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        self._close_bar()
        self.stream.write(text + "\n")
        self.stream.flush()

    def bar(self, label: str, done: int, total: int, suffix: str = "") -> None:
        """A one-line progress bar on stderr, at most ten updates a second (terminals only)."""
        if not self.tty:
            return
        now = time.monotonic()
        if done < total and now - self._last_bar < 0.1:
            return
        self._last_bar = now
        width = 28
        filled = int(width * done / max(total, 1))
        self.err.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {suffix}\x1b[K")
        self.err.flush()
        self._bar_open = True

    def _close_bar(self) -> None:
        if self._bar_open:
            self.err.write("\n")
            self._bar_open = False


# -- argument parsing --------------------------------------------------------------------------------------
def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, from the field's own metadata (type, choices, help)."""
    skip = {"data", "out", "model", "weights", "strategy", "epochs"}
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default = f.default
        base = str(f.type).replace(" | None", "")
        help_text = meta.get("help", "")
        if meta.get("min") is not None:
            help_text += f" [{meta['min']:g}..{meta['max']:g}]"
        if base == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kinds: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "float | str": parse_rate}
            kind = kinds.get(base, str)
            p.add_argument(
                flag,
                type=kind,
                default=default,
                choices=meta.get("choices"),
                help=f"{help_text} (default: {default})",
                metavar=None if meta.get("choices") else ("RATE" if base == "float | str" else base.upper()),
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Fine-tune AlexNet, GoogLeNet, ResNets (or LeNet) on a folder of labeled images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model on a dataset folder or zip",
        description="Train on DATA (one sub-folder per class) into the run directory --out.",
    )
    t.add_argument("data", nargs="?", help="dataset folder or .zip")
    t.add_argument("--out", help="run directory to create")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    t.add_argument("--model", default="resnet18", choices=fields["model"].metadata["choices"], help="architecture")
    t.add_argument("--weights", default="imagenet", help=fields["weights"].metadata["help"] + " (default: imagenet)")
    t.add_argument(
        "--strategy",
        default="auto",
        choices=fields["strategy"].metadata["choices"],
        help=fields["strategy"].metadata["help"],
    )
    t.add_argument("--epochs", type=int, default=None, help=fields["epochs"].metadata["help"])
    _add_config_options(t)
    t.add_argument("--json", action="store_true", help="print events and the result as JSON lines")

    e = sub.add_parser("eval", help="evaluate a run on a folder of labeled images")
    e.add_argument("run_dir")
    e.add_argument("data")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best")
    e.add_argument("--device", default="auto")
    e.add_argument("--cache-dir")
    e.add_argument("--json", action="store_true")

    pr = sub.add_parser(
        "predict", help='print the label (or "unknown" below the calibrated threshold) and top-k labels of images'
    )
    pr.add_argument("run_dir")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--checkpoint", choices=("best", "last"), default="best")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--json", action="store_true")

    x = sub.add_parser(
        "export",
        help="export a run as ONNX or TorchScript, checked against PyTorch",
        description="Write the run's network with its preprocessing and class names as one file, after checking it "
        "against the PyTorch model on the run's test split: a float32 export must agree on every image's top-1 "
        "label with probabilities within 1e-4, or it is refused (exit 1). onnx-int8 reports its accuracy change.",
    )
    x.add_argument("run_dir")
    x.add_argument("--format", choices=("onnx", "torchscript", "onnx-int8"), default="onnx")
    x.add_argument("--out", help="also copy the file here (it is kept in RUN_DIR/exports/ either way)")
    x.add_argument("--images", nargs="+", metavar="IMAGE", help="check on these images instead of the test split")
    x.add_argument("--force", action="store_true", help="export again even if a checked export exists")
    x.add_argument(
        "--measure",
        action="store_true",
        help="then measure the serving runtimes on this machine (PyTorch eager, channels-last, torch.compile, "
        "ONNX Runtime) and record the fastest in RUN_DIR/serving.json",
    )
    x.add_argument("--batch", type=int, default=8, help="batch size for --measure (default: 8)")
    x.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="check a dataset and print its report")
    i.add_argument("data")
    i.add_argument("--val-fraction", type=float, default=0.1)
    i.add_argument("--test-fraction", type=float, default=0.1)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--cache-dir", help="where zips are extracted (default ~/.cache/finetune)")
    i.add_argument("--files", action="store_true", help="list every file and its split")
    i.add_argument("--json", action="store_true")

    c = sub.add_parser(
        "cache",
        help="show the pixel store (decoded images) and its budget, or clear it",
        description="The pixel store keeps every checked image decoded, packed in a few shard files, within "
        "a byte budget (--max-bytes or $FINETUNE_CACHE_MAX_BYTES; default a fifth of the disk). "
        "`clear` drops every shard no running job is reading; they are rebuilt when needed.",
    )
    c.add_argument("action", nargs="?", choices=("info", "clear"), default="info")
    c.add_argument("--cache-dir", help="the cache folder (default ~/.cache/finetune)")
    c.add_argument("--json", action="store_true")

    w = sub.add_parser("weights", help="list, fetch or import pretrained ImageNet weights")
    wsub = w.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wl = wsub.add_parser("list", help="show which ImageNet weight files are cached and verified")
    wl.add_argument("--dir", help="weights folder (default: torch's cache)")
    wl.add_argument("--json", action="store_true")
    wf = wsub.add_parser("fetch", help="download an architecture's ImageNet weights into the cache")
    wf.add_argument("arch")
    wf.add_argument("--dir")
    wf.add_argument("--url", help="download from this mirror instead of download.pytorch.org")
    wi = wsub.add_parser("import", help="copy a weights file into the cache after checking its hash")
    wi.add_argument("arch")
    wi.add_argument("file")
    wi.add_argument("--dir")
    wi.add_argument(
        "--accept-unverified",
        action="store_true",
        help="import even if the file does not match torchvision's published hash",
    )
    return parser


# -- commands ----------------------------------------------------------------------------------------------
def launch_command(devices: int, argv: Sequence[str]) -> list[str]:
    """This command again under torchrun's module (``torch.distributed.run``): one process per device on
    this host, a standalone rendezvous (a free local port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={devices}",
        "-m",
        "finetune",
        *argv,
    ]


def _requested_devices(args: argparse.Namespace) -> int:
    if args.resume:
        run_file = Path(args.resume) / "run.json"
        if not run_file.is_file():
            return 1  # the resume itself says what is wrong
        return int(json.loads(run_file.read_text()).get("config", {}).get("devices", 1))
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.data and args.out:
        TrainConfig(**values).validate()  # bad settings exit 2 here, before any process starts
    return int(args.devices)


def run_under_torchrun(devices: int, argv: Sequence[str]) -> int:
    """Start the ranks and wait for them; torchrun ends every rank when one fails. Ctrl-C reaches every
    process of the terminal's group: each rank stops at the same batch boundary."""
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return -1  # this is a rank already (torch is not imported here: the launch starts at once)
    env = dict(os.environ)
    # torchrun would give each rank one thread; share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.run(launch_command(devices, argv), env=env, check=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    return EXIT_FAILURE if proc.returncode not in (EXIT_OK, EXIT_CANCELLED) else proc.returncode


def cmd_train(args: argparse.Namespace, out: Output) -> int:
    from .train import resume, train

    stop_requested = {"flag": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop_requested["flag"]:
            raise KeyboardInterrupt
        stop_requested["flag"] = True
        out.line("stopping after this batch (Ctrl-C again to abort at once)...")

    previous = signal.signal(signal.SIGINT, on_sigint)
    callback = _train_printer(out)
    try:
        if args.resume:
            result = resume(args.resume, [callback], lambda: stop_requested["flag"])
        else:
            if not args.data or not args.out:
                raise InputError("train needs DATA and --out RUN_DIR (or --resume RUN_DIR)")
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
            config = TrainConfig(**values)
            result = train(config, [callback], lambda: stop_requested["flag"])
    finally:
        signal.signal(signal.SIGINT, previous)
    if os.environ.get("RANK", "0") != "0":
        return EXIT_OK  # rank 0 reports for the run
    if out.as_json:
        out.json(
            {
                "kind": "result",
                "run_dir": str(result.run_dir),
                "best_epoch": result.best_epoch,
                "best_metric": result.best_metric,
                "monitor": result.monitor,
                "evaluation": result.evaluation,
            }
        )
    else:
        _print_evaluation(out, result.evaluation)
        out.line(f"run saved in {result.run_dir} (best epoch {result.best_epoch})")
    return EXIT_OK


def _train_printer(out: Output) -> Callable[[Any], None]:
    def on_event(event: Any) -> None:
        if out.as_json:
            if event.kind != "batch_end":
                out.json(event.to_dict())
            return
        kind = event.kind
        if kind == "progress":
            out.bar(event.stage, event.done, event.total)
        elif kind == "batch_end":
            eta = f"eta {_duration(event.eta)}" if event.eta is not None else ""
            out.bar(
                f"epoch {event.epoch}/{event.total_epochs}",
                event.batch,
                event.num_batches,
                f"loss {event.loss:.3f} acc {event.accuracy:.3f} {event.images_per_sec:.0f} img/s {eta}",
            )
        elif kind == "run_started":
            out.line(
                f"{event.arch}, {event.strategy}, {event.num_classes} classes: {event.train_images} train / "
                f"{event.val_images} val / {event.test_images} test images on {event.device}"
                + (f" (resuming after epoch {event.resumed_from_epoch})" if event.resumed_from_epoch else "")
            )
        elif kind == "stage_started":
            out.line(f"- {event.description}")
        elif kind == "epoch_end":
            best = " *" if event.is_best else ""
            out.line(
                f"epoch {event.epoch:>3}/{event.total_epochs} [{event.stage}] train loss {event.train_loss:.4f} "
                f"acc {event.train_acc:.4f} | val loss {event.val_loss:.4f} acc {event.val_acc:.4f} | "
                f"{event.images_per_sec:.0f} img/s {event.epoch_time:.1f}s{best}"
            )
        elif kind == "oom_retry":
            out.line(
                f"CUDA out of memory: micro-batch {event.old_micro_batch} -> {event.new_micro_batch} "
                f"with {event.accumulation_steps} accumulation steps"
            )
        elif kind == "early_stopped":
            out.line(f"early stopping at epoch {event.epoch} (best epoch {event.best_epoch} by {event.monitor})")
        elif kind == "defaults_chosen":
            for choice in event.choices:
                out.line(f"- {choice['reason']}")
        elif kind == "lr_found":
            out.line(f"- learning rate {event.lr:.3g} ({event.method}, {len(event.lrs)} steps)")
        elif kind == "budget_planned":
            out.line(
                f"- budget {_duration(event.budget_seconds)}: {event.reason}; "
                f"{event.train_images_per_sec:.0f} img/s training, eta {_duration(event.estimated_seconds)}"
            )
        elif kind == "budget_reached":
            out.line(f"budget reached after epoch {event.epoch} ({_duration(event.elapsed)}): stopping")

    return on_event


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _print_evaluation(out: Output, evaluation: dict[str, Any]) -> None:
    for split in ("val", "test"):
        m = evaluation.get(split)
        if not m or not m.get("count"):
            continue
        top5 = f" top-5 {m['top5']:.4f}" if "top5" in m else ""
        out.line(
            f"{split}: {m['count']} images, loss {m['loss']:.4f}, top-1 {m['top1']:.4f}{top5}, "
            f"macro F1 {m['macro_f1']:.4f}"
        )


def cmd_eval(args: argparse.Namespace, out: Output) -> int:
    from .evaluate import evaluate_run

    result = evaluate_run(
        args.run_dir, args.data, checkpoint=args.checkpoint, device=args.device, cache_dir=args.cache_dir
    )
    if out.as_json:
        out.json(result)
        return EXIT_OK
    m = result["metrics"]
    _print_evaluation(out, {"test": m})
    width = max(len(c["class"]) for c in m["per_class"])
    out.line(f"{'class':<{width}}  precision  recall     f1  support")
    for c in m["per_class"]:
        out.line(f"{c['class']:<{width}}  {c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:6.4f} {c['support']:8d}")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace, out: Output) -> int:
    from .errors import ImageError
    from .predict import Predictor

    if args.top_k < 1:
        raise InputError("--top-k must be at least 1")
    predictor = Predictor.from_run(args.run_dir, args.checkpoint, args.device)
    status = EXIT_OK
    results = []
    for path in args.images:
        try:
            probs = predictor.probabilities([predictor.preprocess(Path(path))])
            (preds,), (label,) = predictor.top_k(probs, args.top_k), predictor.answer(probs)
            results.append({"image": path, "label": label, "predictions": [p.to_dict() for p in preds]})
        except ImageError as e:
            status = EXIT_BAD_INPUT
            results.append({"image": path, "error": str(e)})
    if out.as_json:
        out.json(results)
    else:
        for r in results:
            if "error" in r:
                out.line(f"{r['image']}: error: {r['error']}")
                continue
            out.line(f"{r['image']}: {r['label']}")
            for p in r["predictions"]:
                out.line(f"  {p['probability']:7.2%}  {p['label']}")
    return status


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    import shutil

    from .export import ParityError, export_run

    if args.batch < 1:
        raise InputError("--batch must be at least 1")
    try:
        result = export_run(args.run_dir, args.format, images=[Path(p) for p in args.images or []], force=args.force)
    except ParityError as e:
        if out.as_json:
            out.json({"format": args.format, "accepted": False, "parity": e.parity, "error": str(e)})
        else:
            print(f"refused: {e}", file=sys.stderr)
        return EXIT_FAILURE
    path = result.path
    if args.out:
        path = Path(args.out)
        shutil.copyfile(result.path, path)
    report: dict[str, Any] = {"format": args.format, "file": str(path), "accepted": True, "parity": result.parity}
    if args.measure:
        from .predict import Predictor
        from .serving import select_runtime

        precision = "int8" if args.format == "onnx-int8" else "fp32"
        predictor = Predictor.from_run(args.run_dir, device="cpu")
        choice = select_runtime(
            predictor, args.run_dir, precision=precision, batch=args.batch, try_compile=True, remeasure=True
        )
        report["serving"] = {"winner": choice.runtime.name, **choice.measured, "note": choice.note}
    if out.as_json:
        out.json(report)
        return EXIT_OK
    p = result.parity
    out.line(f"{args.format}: {path} ({p['images']} {p['split']} images checked)")
    out.line(
        f"  top-1 agreement with PyTorch {p['top1_agreement']:.2%}, max probability difference {p['max_abs_prob_diff']:.2g}"
    )
    if p.get("accuracy_change_points") is not None:
        out.line(
            f"  top-1 accuracy: PyTorch {p['reference_top1']:.4f}, export {p['export_top1']:.4f} "
            f"({p['accuracy_change_points']:+.2f} points)"
        )
    if "serving" in report:
        s = report["serving"]
        speeds = ", ".join(f"{k} {v:.1f}" for k, v in s["images_per_sec"].items())
        out.line(f"serving at batch {args.batch}, images/s: {speeds}; fastest: {s['winner']}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace, out: Output) -> int:
    from .dataset import DatasetOptions, load_dataset
    from .train import default_cache_dir

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    dataset = load_dataset(
        args.data,
        options=DatasetOptions(val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed),
        extract_dir=cache / "extracted",
        progress=lambda d, t: out.bar("checking images", d, t),
    )
    report = dataset.report(include_files=args.files or args.json)
    if out.as_json:
        out.json(report)
        return EXIT_OK
    out.line(
        f"{report['root']}: {len(report['classes'])} classes, {report['num_images']} usable images "
        f"({report['split']} split)"
    )
    width = max(len(c) for c in report["classes"])
    out.line(f"  {'class':<{width}}  train    val   test")
    for name, c in report["counts"].items():
        out.line(f"  {name:<{width}}  {c['train']:5d}  {c['val']:5d}  {c['test']:5d}")
    sizes = report["image_size"]
    if sizes:
        out.line(
            f"image sizes: width {sizes['width']['min']}-{sizes['width']['max']} (median "
            f"{sizes['width']['median']}), height {sizes['height']['min']}-{sizes['height']['max']} "
            f"(median {sizes['height']['median']})"
        )
    for s in report["skipped"]:
        out.line(f"skipped {s['path']}: {s['reason']}")
    for w in report["warnings"]:
        out.line(f"warning [{w['code']}]: {w['message']}")
    if args.files:
        for f in report["files"]:
            out.line(f"{f['split']:5}  {f['class']}  {f['path']}")
    return EXIT_OK


def cmd_weights(args: argparse.Namespace, out: Output) -> int:
    from . import weights

    if args.weights_command == "list":
        rows = weights.status_all(args.dir)
        if out.as_json:
            out.json([r.to_dict() for r in rows])
            return EXIT_OK
        folder = Path(rows[0].path).parent
        out.line(f"weights folder: {folder}")
        for r in rows:
            if not r.present:
                state = "missing"
            elif r.verified:
                state = "ok (hash verified)"
            elif r.accepted_unverified:
                state = "present, hash mismatch accepted on import"
            else:
                state = "HASH MISMATCH"
            out.line(f"  {r.arch:<10} {r.filename:<32} {state}")
        return EXIT_OK
    if args.weights_command == "fetch":
        path = weights.fetch(args.arch, args.dir, url=args.url, progress=out.tty)
        out.line(f"saved {path}")
        return EXIT_OK
    path = weights.import_file(args.arch, args.file, args.dir, accept_unverified=args.accept_unverified)
    out.line(f"imported {args.file} as {path}")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace, out: Output) -> int:
    from .datastore import open_store
    from .runtime import default_cache_dir

    store = open_store(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    try:
        freed = store.evict_all_unpinned() if args.action == "clear" else None
        usage = store.usage()
    finally:
        store.close()
    if out.as_json:
        out.json({"root": str(store.root), **usage, **({"freed_bytes": freed} if freed is not None else {})})
        return EXIT_OK
    if freed is not None:
        out.line(f"cleared {freed / 1e6:.1f} MB")
    out.line(
        f"{store.root}: {usage['entries']} images in {usage['shards']} shards, {usage['used_bytes'] / 1e6:.1f} MB "
        f"of a {usage['max_bytes'] / 1e9:.2f} GB budget ({usage['pinned_bytes'] / 1e6:.1f} MB in use by running jobs)"
    )
    return EXIT_OK


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "export": cmd_export,
    "inspect": cmd_inspect,
    "cache": cmd_cache,
    "weights": cmd_weights,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(getattr(args, "json", False))
    try:
        if args.command == "train":
            devices = _requested_devices(args)
            if devices > 1:
                rc = run_under_torchrun(devices, list(sys.argv[1:] if argv is None else argv))
                if rc >= 0:
                    return rc
        return COMMANDS[args.command](args, out)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Cancelled as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as e:
        if os.environ.get("FINETUNE_DEBUG"):
            raise
        print(f"failed: {type(e).__name__}: {e} (set FINETUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
