"""Every setting of the service, in one place, read from ``FINETUNE_*`` environment variables (or a
``.env`` file). The defaults run everything embedded: SQLite in WAL mode, SqliteHuey, a local data folder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
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
    host: str = "127.0.0.1"
    port: int = 8000

    # Uploads
    max_upload_bytes: int = Field(2 * 1024**3, description="largest dataset upload (zip or files), bytes")
    max_upload_files: int = Field(50_000, description="most files in one folder upload")
    max_archive_entries: int = 100_000
    max_extracted_bytes: int = Field(8 * 1024**3, description="most bytes a dataset zip may expand to")
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
    predict_compile: bool = Field(
        False, description="also measure torch.compile when choosing a model's runtime (~20 s of compiling per model)"
    )

    # Jobs
    worker_slots: int | None = Field(
        None, description="jobs run at once by one worker; default: one per GPU, or 1 without a GPU"
    )
    heartbeat_seconds: float = 5.0
    stale_after_seconds: float = 60.0
    cancel_grace_seconds: float = 30.0
    progress_interval_seconds: float = 0.3

    # Per-user limits (0 turns one off). Rate limits are token buckets kept by each API process.
    rate_limit_predict_per_minute: float = Field(1200, ge=0, description="predict requests per user per minute")
    rate_limit_uploads_per_hour: float = Field(60, ge=0, description="dataset uploads per user per hour")
    max_queued_jobs_per_user: int = Field(20, ge=0, description="jobs one user may have waiting in the queue")

    # Engine
    weights_dir: Path | None = Field(None, description="torchvision weights folder (default: torch's cache)")
    assets_dir: Path = Field(REPO_ROOT / "node_modules", description="where `make install` put the chart library")

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'service.db'}"

    @property
    def cache_dir(self) -> Path:
        """The engine's cache (decoded pixels, features): shared by every job on this data folder."""
        return self.data_dir / "cache"


@lru_cache
def get_settings() -> Settings:
    return Settings()
