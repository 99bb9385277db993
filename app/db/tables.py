"""The schema, as SQLAlchemy 2.0 typed models. Alembic migrations create it; nothing else does.

Every row has an owner (one local user until access control arrives). Files live under the data folder
at the relative ``storage_key``/``run_key`` the rows point to; nothing is found by listing folders.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
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

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")


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
    __tablename__ = "datasets"

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
    status: Mapped[str] = mapped_column(String(16), default="queued")
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
    # Execution bookkeeping: which attempt holds the job; a stale attempt's writes are refused.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
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
