"""``finetune-service``: serve (API + one worker), worker (workers on their own), migrate.

python -m app.cli serve [--host 127.0.0.1] [--port 8000] [--no-worker]
python -m app.cli worker
python -m app.cli migrate [--revision head]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from app.jobs.lifetime import PARENT_PID_ENV
from app.security import InsecureDependencyError, check_dependencies
from app.settings import Settings, get_settings

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
    check_dependencies()
    import uvicorn

    from app.db.migrate import upgrade
    from app.main import create_app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    host = args.host or settings.host
    port = args.port or settings.port
    announce_first_login(settings, host, port)
    supervisor = WorkerSupervisor() if not args.no_worker else None
    if supervisor:
        supervisor.start()
    print(f"finetune-service on http://{host}:{port}  (data: {settings.data_dir}, API docs: /docs)", flush=True)
    # uvicorn re-raises SIGTERM once it has shut down: as SystemExit it unwinds to the `finally` that stops the
    # worker (the default action would end this process there and then, and leave the worker running).
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        app = create_app(settings)
        # What is imported and built by now (torch, the app: ~400k objects) lives as long as the process: keep it
        # out of the garbage collector's view. Otherwise each full collection walks it all, ~200 ms with the GIL
        # held, and the event loop stalls that long (it showed as /healthz spikes while uploads allocated).
        gc.freeze()
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        if supervisor:
            supervisor.stop()
    return 0


def announce_first_login(settings: Settings, host: str, port: int) -> None:
    """First start (nobody can log in yet): create the admin's key and a one-time login link and print
    them once, as Jupyter prints its token."""
    from app.db import session_scope
    from app.services import auth

    with session_scope(settings.db_url) as session:
        first = auth.bootstrap_admin(session)
    if first is None:
        return
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    bar = "=" * 78
    print(
        f"\n{bar}\n  First start: created the admin user {first.user.name!r}.\n"
        f"  Log in to the pages with this one-time link (valid for 24 hours):\n\n"
        f"      http://{shown}:{port}/login?token={first.login_token}\n\n"
        f"  API key for REST clients (shown only now; send it as `Authorization: Bearer <key>`):\n\n"
        f"      {first.key}\n\n"
        f"  More users and keys: python -m app.cli users --help\n{bar}\n",
        flush=True,
    )


def cmd_users(args: argparse.Namespace) -> int:
    """Admin commands for users and their API keys (exit code 2 for a request that cannot be done)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.db.migrate import upgrade
    from app.db.tables import ApiKey, User
    from app.services import auth, users
    from app.storage import Storage

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    files: list[str] = []  # storage keys to remove once the rows are gone
    try:
        with session_scope(settings.db_url) as s:
            if args.action == "list":
                for user in s.scalars(select(User).order_by(User.created_at)):
                    keys = s.scalars(select(ApiKey).where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None)))
                    shown = ", ".join(f"{k.prefix}... ({k.label})" for k in keys) or "no active key"
                    print(f"{user.name:<24} {'admin' if user.is_admin else 'user ':<6} {shown}")
            elif args.action == "create":
                user = auth.create_user(s, args.name, admin=args.admin)
                issued = auth.issue_key(s, user, args.label)
                print(f"created {'admin' if user.is_admin else 'user'} {user.name!r}; API key (shown only now):")
                print(issued.key)
            elif args.action == "key":
                issued = auth.issue_key(s, auth.get_user(s, args.name), args.label)
                print(issued.key)
            elif args.action == "revoke":
                count = auth.revoke_key(s, args.name)
                if count == 0:
                    raise auth.UserError(f"no active key starts with {args.name!r}")
                print(f"revoked {count} key(s)")
            elif args.action == "login-link":
                token = auth.issue_login_token(s, auth.get_user(s, args.name))
                print(f"http://{settings.host}:{settings.port}/login?token={token}")
            elif args.action == "delete":
                files = users.delete_user(s, auth.get_user(s, args.name))
    except auth.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.action == "delete":
        storage = Storage(settings.data_dir)
        for key in files:
            storage.delete(key)
        print(f"deleted user {args.name!r}: keys, sessions, datasets, jobs and models ({len(files)} folder(s) removed)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    check_dependencies()
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
    u = sub.add_parser("users", help="manage users and their API keys")
    u.add_argument("action", choices=("list", "create", "key", "revoke", "login-link", "delete"))
    u.add_argument("name", nargs="?", default="", help="user name (revoke: the key's prefix as `list` shows it)")
    u.add_argument("--admin", action="store_true", help="create: the user sees and manages everything")
    u.add_argument("--label", default="cli", help="a label for the new key")
    args = parser.parse_args(argv)
    if args.command == "users" and args.action != "list" and not args.name:
        parser.error(f"users {args.action} needs a NAME")
    # `users` is an admin's one-shot command: its output is its answer, not the migrations' progress.
    default_level = "WARNING" if args.command == "users" else "INFO"
    logging.basicConfig(
        level=os.environ.get("FINETUNE_LOG_LEVEL", default_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    commands = {"serve": cmd_serve, "worker": cmd_worker, "migrate": cmd_migrate, "users": cmd_users}
    try:
        return commands[args.command](args)
    except InsecureDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
