"""``finetune-service``: serve (API + one worker), worker (workers on their own), migrate.

python -m app.cli serve [--host 127.0.0.1] [--port 8000] [--no-worker]
python -m app.cli worker
python -m app.cli migrate [--revision head]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from app.jobs.lifetime import PARENT_PID_ENV
from app.settings import get_settings

log = logging.getLogger("app.cli")


class WorkerSupervisor:
    """Runs ``app.cli worker`` next to the API and restarts it if it dies (a crash loses no job: the
    restarted worker recovers what the dead one held)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            started = time.monotonic()
            env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
            self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env)
            code = self.proc.wait()
            if self.stopping.is_set():
                return
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            log.error("worker exited with code %s; restarting in %.0fs", code, backoff)
            self.stopping.wait(backoff)

    def stop(self) -> None:
        self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.db.migrate import upgrade
    from app.main import create_app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    supervisor = WorkerSupervisor() if not args.no_worker else None
    if supervisor:
        supervisor.start()
    host = args.host or settings.host
    port = args.port or settings.port
    print(f"finetune-service on http://{host}:{port}  (data: {settings.data_dir}, API docs: /docs)", flush=True)
    # uvicorn re-raises SIGTERM once it has shut down: as SystemExit it unwinds to the `finally` that stops the
    # worker (the default action would end this process there and then, and leave the worker running).
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        if supervisor:
            supervisor.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app.jobs.worker import run_worker

    run_worker(get_settings())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.db.migrate import downgrade, upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if args.down:
        downgrade(settings.db_url, args.revision or "base")
    else:
        upgrade(settings.db_url, args.revision or "head")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="apply migrations, start the API and one worker")
    s.add_argument("--host", help="address to bind (default FINETUNE_HOST or 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default FINETUNE_PORT or 8000)")
    s.add_argument("--no-worker", action="store_true", help="API only (run workers with the worker command)")
    sub.add_parser("worker", help="run a worker: take jobs from the queue and train")
    m = sub.add_parser("migrate", help="apply (or with --down, revert) database migrations")
    m.add_argument("--revision")
    m.add_argument("--down", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("FINETUNE_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return {"serve": cmd_serve, "worker": cmd_worker, "migrate": cmd_migrate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
