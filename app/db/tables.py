"""The schema, as SQLAlchemy 2.0 typed models. Alembic migrations create it; nothing else does.

Every row has an owner (one local user until access control arrives). Files live under the data folder
at the relative ``storage_key``/``run_key`` the rows point to; nothing is found by listing folders.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
JSONType = JSON().with_variant(JSONB(), "postgresql")
# Byte counts pass 2 GiB (uploads up to 2 GiB expanding to 8 GiB, runs of large models); SQLite's INTEGER is
# 64-bit already.
ByteCount = BigInteger().with_variant(Integer(), "sqlite")


class JobStatus(StrEnum):
    """A job's status. Only ``app.jobs.state`` changes it, each time with a conditional UPDATE."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_STATUSES = tuple(s.value for s in JobStatus)
DATASET_STATUSES = ("checking", "ready", "refused")
FINISHED_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
# The column stays VARCHAR(16) with its CHECK constraint (no native enum type: adding a status later is then
# a constraint change, not an ALTER TYPE that PostgreSQL cannot run inside a transaction).
JobStatusType = Enum(
    JobStatus,
    native_enum=False,
    create_constraint=False,
    length=16,
    values_callable=lambda e: [m.value for m in e],
    validate_strings=True,
)


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSONType, list[Any]: JSONType}


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; ``prefix`` (the first characters) identifies it to people."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class WebSession(Base):
    """A browser session: the cookie's SHA-256, and the CSRF token its state-changing requests must send.
    It belongs to the API key it was made with (revoking the key ends it), or, made with a one-time login
    link, to its user alone (deleting the user ends it)."""

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class LoginToken(Base):
    """A one-time login link (printed by the serve command at first start, or by `users login-link`)."""

    __tablename__ = "login_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()


class Dataset(Base):
    """An upload. ``checking`` while its files are checked (``progress`` says how far, the checker renews
    ``lease_expires_at``), then ``ready`` (jobs may use it) or ``refused`` (``error`` says why; no files)."""

    __tablename__ = "datasets"
    __table_args__ = (CheckConstraint(f"status IN {DATASET_STATUSES}", name="status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    storage_key: Mapped[str] = mapped_column(String(200))  # folder under the data dir
    source: Mapped[str] = mapped_column(String(16))  # "zip" | "files"
    num_images: Mapped[int] = mapped_column(Integer)
    num_classes: Mapped[int] = mapped_column(Integer)
    classes: Mapped[list[Any]] = mapped_column()
    report: Mapped[dict[str, Any]] = mapped_column()
    size_bytes: Mapped[int] = mapped_column(ByteCount, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")
    progress: Mapped[dict[str, Any] | None] = mapped_column()  # {"phase", "done", "total"} while checking
    error: Mapped[dict[str, Any] | None] = mapped_column()  # {"code", "message"} when refused
    lease_expires_at: Mapped[datetime | None] = mapped_column()  # the check's lease, on the database's clock

    jobs: Mapped[list[Job]] = relationship(back_populates="dataset", lazy="raise")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN {JOB_STATUSES}", name="status"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # NULL once the dataset is deleted: the job's history and model stay, it just cannot be resumed.
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    status: Mapped[JobStatus] = mapped_column(JobStatusType, default=JobStatus.QUEUED)
    config: Mapped[dict[str, Any]] = mapped_column()  # the engine's TrainConfig fields a user set
    arch: Mapped[str] = mapped_column(String(32))
    weights: Mapped[str] = mapped_column(String(16))
    strategy: Mapped[str] = mapped_column(String(16))
    run_key: Mapped[str] = mapped_column(String(200))  # run directory under the data dir
    # Live progress, written by the job process (coarse: a few times a second at most).
    stage: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(String(300))
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1 over the whole run
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    total_epochs: Mapped[int] = mapped_column(Integer, default=0)
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    images_per_sec: Mapped[float | None] = mapped_column(Float)
    # Execution bookkeeping: which attempt holds the job; a stale attempt's writes are refused. The holder
    # keeps a lease on the database's clock (lease_expires_at); once it lapses, any worker may take the job back.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))  # the holding worker's id (workers.id)
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    # When a queue message was last sent for it: a queued job whose message is lost is sent another.
    enqueued_at: Mapped[datetime | None] = mapped_column()
    # Automatic retries after the process or its worker died (capped), and why the last one happened.
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    retry_reason: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    data_split: Mapped[dict[str, Any] | None] = mapped_column()  # the split the run trains on (counts, source)
    # What the run decided itself: {"defaults": [{setting, value, reason}], "lr_finder": {lr, method, lrs,
    # losses}, "budget": {epochs, estimated_seconds, reason, ...}}, as the engine reported it.
    run_choices: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    dataset: Mapped[Dataset | None] = relationship(back_populates="jobs", lazy="raise")
    metrics: Mapped[list[JobMetric]] = relationship(
        back_populates="job", lazy="raise", cascade="all, delete-orphan", order_by="JobMetric.epoch"
    )


class JobMetric(Base):
    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "epoch", name="job_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16))
    train_loss: Mapped[float] = mapped_column(Float)
    train_acc: Mapped[float] = mapped_column(Float)
    val_loss: Mapped[float] = mapped_column(Float)
    val_acc: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    images_per_sec: Mapped[float] = mapped_column(Float)
    epoch_time: Mapped[float] = mapped_column(Float)
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="metrics", lazy="raise")


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    arch: Mapped[str] = mapped_column(String(32))
    num_classes: Mapped[int] = mapped_column(Integer)
    classes: Mapped[list[Any]] = mapped_column()
    evaluation: Mapped[dict[str, Any]] = mapped_column()  # val/test metrics, per class, confusion matrix
    config: Mapped[dict[str, Any]] = mapped_column()
    run_key: Mapped[str] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(ByteCount, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # "fp32", or "int8" (ONNX Runtime, quantized) once the owner has seen its accuracy change on the test split.
    serving_precision: Mapped[str] = mapped_column(String(8), default="fp32", server_default="fp32")
    # The owner's "unknown" threshold for predict (0..1); None: the one chosen on validation after training,
    # which lives with the calibration in the checkpoint's metadata.
    threshold: Mapped[float | None] = mapped_column(Float, default=None)


class Worker(Base):
    """A worker process, registered at its start under a random id (host and pid only describe it: two
    containers can both be ``PID 1`` on one host name). It renews its lease on the database's clock."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    slots: Mapped[int] = mapped_column(Integer)
    devices: Mapped[list[Any]] = mapped_column()  # GPU ids its jobs are pinned to; cpu:N entries on a CPU host
    weights: Mapped[list[Any]] = mapped_column()  # architectures whose ImageNet weights it holds
    started_at: Mapped[datetime] = mapped_column()
    heartbeat_at: Mapped[datetime] = mapped_column()
    lease_expires_at: Mapped[datetime] = mapped_column(index=True)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    stopped_at: Mapped[datetime | None] = mapped_column()
