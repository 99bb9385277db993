"""Where one predict request's time goes: ``python -m bench.profile_predict [--clients 1] [--seconds 15]``.

Starts the real service on a fresh data folder, trains a resnet18 through its API (224 px, 1 epoch), lets it
choose its runtime, then sends raw JPEGs (400x300 unless ``--size``) from ``--clients`` closed-loop clients while py-spy samples
the API process (all threads, idle samples left out). Prints the share of samples per part of the request
path: the forward pass, decoding and cropping, the event loop's own work (HTTP, routing, authentication,
the answer), and the rest. py-spy is a tool, not a dependency: it is installed into its own environment
under ``~/.cache/finetune-bench/tools`` the first time.
"""

from __future__ import annotations

import argparse
import collections
import random
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.common import admin_key, free_port, service_env, start_process, stop_process, wait_http
from bench.data import SHAPES, make_photo
from bench.loadgen import run_load
from bench.serving_bench import SIZES, train_served_model, wait_runtime

TOOLS = Path.home() / ".cache" / "finetune-bench" / "tools"
# (part, substrings of a stack's frames that put a sample there), first match wins
PARTS = (
    ("forward pass (network)", ("Session.run", "finetune/serving.py", "torch/nn/", "finetune/export.py")),
    ("decode + resize + crop", ("finetune/images.py", "finetune/predict.py", "finetune/loader.py", "PIL/")),
    ("batcher and thread hops", ("batcher.py", "concurrent/futures", "asyncio/futures.py", "anyio/", "to_thread")),
    ("authentication, model lookup", ("api/deps.py", "keycache.py", "sqlalchemy", "services/auth.py")),
    ("HTTP, routing, validation, JSON", ("uvicorn/", "h11", "httptools", "starlette/", "fastapi/", "pydantic")),
)


def py_spy() -> Path:
    exe = TOOLS / "bin" / "py-spy"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True)
        subprocess.run([str(TOOLS / "bin" / "pip"), "install", "--quiet", "py-spy"], check=True)
    return exe


def classify(stack: str) -> str:
    for part, needles in PARTS:
        if any(n in stack for n in needles):
            return part
    return "other (event loop, logging, GC, ...)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--size", choices=tuple(SIZES), default="web", help="JPEG size, as in bench serving")
    args = parser.parse_args()
    spy = py_spy()
    work = Path(tempfile.mkdtemp(prefix="profile-predict-"))
    env = service_env(work / "data")
    auth = {"Authorization": f"Bearer {admin_key(env)}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = start_process(["-m", "app.cli", "serve", "--port", str(port)], env, work / "serve.log")
    try:
        wait_http(f"{base}/healthz")
        model_id, _ = train_served_model(base, auth, work, True, print)
        images = [make_photo(SHAPES[i % 4], random.Random(i), SIZES[args.size]) for i in range(16)]
        if args.precision == "int8":
            from bench.serving_bench import set_int8

            set_int8(base, auth, model_id)
        served = wait_runtime(base, auth, model_id, images[0])
        print(f"served with {served['loaded_here']['runtime']}")
        out = work / "profile.txt"
        url = f"{base}/api/v1/models/{model_id}/predict"
        result: dict[str, object] = {}
        load = threading.Thread(
            target=lambda: result.update(
                run_load(url, None, images, concurrency=args.clients, duration=args.seconds, warmup=1, headers=auth)
            )
        )
        load.start()
        subprocess.run(
            [
                str(spy),
                "record",
                "--pid",
                str(serve.pid),
                "--duration",
                str(int(args.seconds)),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(out),
                "--threads",
                "--nonblocking",
            ],
            check=True,
            capture_output=True,
        )
        load.join()
        counts: collections.Counter[str] = collections.Counter()
        for line in out.read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            counts[classify(stack)] += int(samples)
        total = sum(counts.values()) or 1
        print(f"{result.get('rps', 0):.1f} req/s at {args.clients} client(s); py-spy samples of the API process:")
        for part, count in counts.most_common():
            print(f"  {count / total:6.1%}  {part}")
    finally:
        stop_process(serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
