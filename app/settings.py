"""Every setting of the service, in one place, read from ``FINETUNE_*`` environment variables (or a
``.env`` file). The defaults run everything embedded: SQLite in WAL mode, SqliteHuey, a local data folder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("data"), description="uploads, run directories, caches, the SQLite files")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite:///<data_dir>/service.db. "
        "PostgreSQL: postgresql+psycopg://user@host/db",
    )
    queue_backend: Literal["sqlite", "postgres", "redis"] = "sqlite"
    queue_url: str | None = Field(None, description="postgres DSN or redis URL for a shared queue")
    queue_name: str = "finetune-jobs"
    multi_host: bool | None = Field(
        None,
        description="several hosts share the database, the queue and the data folder. Default: yes when the "
        "queue is shared (postgres or redis). Then SQLite anywhere is refused at start, and caches default to "
        "this host's home folder",
    )
    host: str = "127.0.0.1"
    port: int = 8000

    # Uploads
    max_upload_bytes: int = Field(16 * 1024**3, description="largest dataset upload (zip or files), bytes")
    max_upload_files: int = Field(50_000, description="most files in one folder upload")
    max_archive_entries: int = Field(1_000_000, description="most entries in a dataset zip")
    max_extracted_bytes: int = Field(64 * 1024**3, description="most bytes a dataset zip may expand to")
    max_concurrent_checks: int = Field(2, ge=1, description="uploads checked at once by one API process")
    max_compression_ratio: float = Field(
        200.0, description="most a zip entry may expand over its compressed size (images hardly compress; bombs do)"
    )
    max_image_pixels: int = 89_478_485

    # Prediction
    max_predict_bytes: int = Field(20 * 1024**2, description="largest predict request body")
    max_predict_images: int = 32
    model_cache_size: int = Field(4, description="models kept loaded for prediction (LRU)")
    predict_max_batch: int = 32
    predict_max_wait_ms: float = 4.0
    predict_batch_ms: float = Field(
        100.0,
        gt=0,
        description="how long one batched forward pass may take: each model's batch is capped at its measured "
        "images/s times this (at most predict_max_batch), so under load a request waits for a few short passes, "
        "not behind one long one",
    )
    predict_runtime: Literal["auto", "torch"] = Field(
        "auto",
        description="auto: measure PyTorch (eager, channels-last) and ONNX Runtime for each model on this host and "
        "serve the fastest; torch: PyTorch only",
    )
    predict_threads: int | None = Field(
        None,
        ge=1,
        description="threads of each forward pass on a CPU (default: every core this process may use; with several "
        "API processes on one machine, give each its share)",
    )
    predict_lanes: int = Field(
        2,
        ge=1,
        le=16,
        description="forward passes of one model that may run side by side on a CPU under load, each on its share "
        "of the threads (ONNX Runtime); a lone request still runs on every thread. 1: one pass at a time",
    )
    predict_compile: bool = Field(
        False, description="also measure torch.compile when choosing a model's runtime (~20 s of compiling per model)"
    )

    # Jobs
    worker_slots: int | None = Field(
        None, description="jobs run at once by one worker; default: one per GPU, or 1 without a GPU"
    )
    cpu_devices: int = Field(
        2,
        ge=1,
        description="on a worker without GPUs: how many data-parallel processes (gloo) one job may ask for with "
        "devices (1: one process per job); a GPU worker offers one device per GPU",
    )
    # A running job is held under a lease on the database's clock, renewed every heartbeat; a worker that
    # dies stops renewing, and within lease_seconds + recovery_interval_seconds another worker takes the job
    # back (12 + 2 s: a kill -9'd worker's job resumes elsewhere well within 20 s). Four missed heartbeats in a
    # row, not one slow one, lose a lease.
    heartbeat_seconds: float = Field(3.0, gt=0)
    lease_seconds: float = Field(12.0, gt=0)
    recovery_interval_seconds: float = Field(2.0, gt=0, description="how often each worker looks for lost jobs")
    lost_message_seconds: float = Field(
        10.0, gt=0, description="a queued job with no queue message for this long is sent another"
    )
    drain_timeout_seconds: float = Field(
        60.0, ge=0, description="SIGTERM: how long a worker waits for its jobs to stop at a batch boundary"
    )
    max_job_retries: int = Field(
        3, ge=0, description="automatic retries of a job whose process was killed or whose worker was lost"
    )
    cancel_grace_seconds: float = 30.0
    progress_interval_seconds: float = 0.3

    # Per-user limits (0 turns one off). Rate limits are token buckets kept by each API process.
    rate_limit_predict_per_minute: float = Field(1200, ge=0, description="predict requests per user per minute")
    rate_limit_uploads_per_hour: float = Field(60, ge=0, description="dataset uploads per user per hour")
    max_queued_jobs_per_user: int = Field(20, ge=0, description="jobs one user may have waiting in the queue")

    # Files: the data folder (shared by every host), or an S3-compatible bucket for datasets, runs and models.
    storage_backend: Literal["filesystem", "s3"] = "filesystem"
    s3_bucket: str | None = None
    s3_prefix: str = Field("", description="keys under this prefix in the bucket")
    s3_endpoint_url: str | None = Field(None, description="for MinIO, Ceph, R2...; credentials: the AWS_* variables")
    s3_region: str | None = None
    local_cache_dir: Path | None = Field(
        None,
        description="this host's caches (decoded pixels, features); never shared between hosts. Default: "
        "<data_dir>/cache on one host, ~/.cache/finetune-service with several",
    )
    temp_stale_seconds: float = Field(
        3600.0, gt=0, description="another process's tmp/ entry untouched this long is a crash's leftover"
    )

    # Engine
    cache_max_bytes: int | None = Field(
        None,
        description="byte budget of this host's pixel store (decoded images), e.g. 50000000000 or 50G; least "
        "recently used shards beyond it are evicted; default: a fifth of the disk holding the cache",
    )
    weights_dir: Path | None = Field(None, description="torchvision weights folder (default: torch's cache)")
    assets_dir: Path = Field(REPO_ROOT / "node_modules", description="where `make install` put the chart library")

    @field_validator("cache_max_bytes", mode="before")
    @classmethod
    def _byte_count(cls, value: object) -> object:
        if isinstance(value, str):
            from finetune.pixelstore import parse_bytes

            return parse_bytes(value) if value.strip() else None
        return value

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.local_cache_dir is not None:
            self.local_cache_dir = self.local_cache_dir.expanduser().resolve()
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("FINETUNE_STORAGE_BACKEND=s3 needs FINETUNE_S3_BUCKET")
        return self

    @property
    def is_multi_host(self) -> bool:
        """Whether several hosts share this service's database, queue and data folder: said by
        FINETUNE_MULTI_HOST, else implied by a shared queue (postgres or redis)."""
        return self.multi_host if self.multi_host is not None else self.queue_backend != "sqlite"

    def deployment_problem(self) -> str | None:
        """Why this configuration must not start, or None. SQLite's locking does not work across hosts (WAL
        needs shared memory: not over NFS), so several hosts need PostgreSQL and a shared queue."""
        if not self.is_multi_host:
            return None
        why = (
            "FINETUNE_MULTI_HOST is set"
            if self.multi_host
            else f"the queue backend is {self.queue_backend!r}, a queue several hosts share"
        )
        problems = []
        if self.db_url.startswith("sqlite"):
            problems.append("the database is SQLite (set FINETUNE_DATABASE_URL=postgresql+psycopg://...)")
        if self.queue_backend == "sqlite":
            problems.append("the queue is SQLite (set FINETUNE_QUEUE_BACKEND=postgres or redis and FINETUNE_QUEUE_URL)")
        if not problems:
            return None
        return (
            f"this is a multi-host configuration ({why}), but {' and '.join(problems)}: SQLite on a shared folder "
            "corrupts or locks up across hosts. Use PostgreSQL and a shared queue, or set FINETUNE_MULTI_HOST=false "
            "if every process runs on this one host."
        )

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'service.db'}"

    @property
    def cache_dir(self) -> Path:
        """This host's cache folder: the engine's decoded pixels and features, and local copies of what the
        object store holds. Every host has its own (never on the shared data folder with several hosts):
        what is in it can always be rebuilt from the data folder."""
        if self.local_cache_dir is not None:
            return self.local_cache_dir
        if self.is_multi_host:
            return Path.home() / ".cache" / "finetune-service"
        return self.data_dir / "cache"


@lru_cache
def get_settings() -> Settings:
    return Settings()
