"""Jobs: creation (validated by the engine's own rules), cancel, resume, delete, and reading progress."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import FINISHED_STATUSES, Dataset, Job, JobMetric, Model, User, utcnow
from app.domain_errors import Conflict, LimitReached, NotFound
from app.settings import Settings
from app.storage import Storage
from finetune import weights as engine_weights
from finetune.config import TrainConfig

# Settings a user never chooses for a server-side job: where data and runs live, which device.
SERVER_OWNED = {"data", "out", "cache_dir", "weights_dir", "device"}
USER_WEIGHTS = ("imagenet", "none")  # a path on the server is never accepted from a client
# Fields a client may send (a job it read back, say) but never sets: the server decides them. They are
# dropped; any other unknown field is still a 422 (a typo in a hyperparameter must not go unnoticed).
CLIENT_IGNORED = frozenset({"owner", "owner_id", "status", "run_key", "id", "attempt", "path", *SERVER_OWNED})


def _hyperparameter_fields() -> dict[str, Any]:
    """Pydantic fields for every TrainConfig setting a user may choose, with the engine's ranges."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in SERVER_OWNED or f.name in ("model", "weights", "strategy"):
            continue
        base = str(f.type).replace(" | None", "")
        py: Any = {"int": int, "float": float, "bool": bool}.get(base, str)
        meta = f.metadata
        if meta.get("choices"):
            py = Literal[tuple(meta["choices"])]
        constraints = {}
        if meta.get("min") is not None and base in ("int", "float"):
            constraints = {"ge": meta["min"], "le": meta["max"]}
        annotation = py | None if "None" in str(f.type) else py
        fields[f.name] = (annotation, Field(f.default, description=meta.get("help"), **constraints))
    return fields


_FIELDS = TrainConfig.__dataclass_fields__
# Literal types built from the engine's choices (runtime values, hence typed Any for mypy).
_ARCHITECTURE: Any = Literal[_FIELDS["model"].metadata["choices"]]
_WEIGHTS: Any = Literal[USER_WEIGHTS]
_STRATEGY: Any = Literal[_FIELDS["strategy"].metadata["choices"]]

JobHyperparameters: type[BaseModel] = create_model(
    "JobHyperparameters", __config__=ConfigDict(extra="forbid"), **_hyperparameter_fields()
)


class JobCreate(JobHyperparameters):
    """A job request: the dataset, the architecture, the weights, the strategy and any hyperparameter."""

    dataset_id: str = Field(description="the dataset to train on")
    model: _ARCHITECTURE = Field("resnet18", description="architecture")
    weights: _WEIGHTS = Field(
        "imagenet",
        description="imagenet (pretrained; the file must be cached on the server, see GET /api/v1/weights) "
        "or none (random initialisation)",
    )
    strategy: _STRATEGY = Field("auto", description=_FIELDS["strategy"].metadata["help"])

    @model_validator(mode="before")
    @classmethod
    def _drop_server_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in CLIENT_IGNORED}
        return data


def validate_request(body: BaseModel, settings: Settings) -> TrainConfig:
    """The engine's TrainConfig for a request, checked by the engine; 422 listing every problem."""
    values = body.model_dump(exclude={"dataset_id"})
    config = TrainConfig(**values, data="<dataset>", out="<run>").validate()
    if config.weights == "imagenet":
        # Refused now, with the engine's message and command, rather than failed later in the worker.
        engine_weights.cached_imagenet_path(config.model, settings.weights_dir)
    return config


def create_job(session: Session, owner: User, dataset: Dataset, config: TrainConfig) -> Job:
    stored = {k: v for k, v in config.to_dict().items() if k not in SERVER_OWNED}
    job = Job(
        owner_id=owner.id,
        dataset_id=dataset.id,
        status="queued",
        config=stored,
        arch=config.model,
        weights=config.weights,
        strategy=config.resolved_strategy(),
        run_key="",
        message="waiting in the queue",
    )
    session.add(job)
    session.flush()
    job.run_key = Storage.run_key(job.id)
    return job


def check_queue_room(session: Session, owner_id: str, settings: Settings) -> None:
    """``LimitReached`` when the user ``owner_id`` already has as many queued jobs as a user may (0: no cap)."""
    cap = settings.max_queued_jobs_per_user
    if cap <= 0:
        return
    queued = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status == "queued")
    )
    if queued is not None and queued >= cap:
        raise LimitReached(
            f"{queued} jobs of this user are queued, the most allowed (max_queued_jobs_per_user = {cap}): "
            "wait for some to start, or cancel some",
            code="too_many_queued_jobs",
            details={"queued": queued, "max_queued_jobs_per_user": cap},
        )


def get_owned(session: Session, owner: User, job_id: str) -> Job:
    # No id holds a NUL, and PostgreSQL refuses one in a query parameter (a 500 instead of this 404).
    job = session.get(Job, job_id) if "\x00" not in job_id else None
    if job is None or (job.owner_id != owner.id and not owner.is_admin):
        raise NotFound("job", job_id)
    return job


def list_owned(session: Session, owner: User, status: str | None = None) -> list[Job]:
    query = select(Job).order_by(Job.created_at.desc())
    if not owner.is_admin:
        query = query.where(Job.owner_id == owner.id)
    if status:
        query = query.where(Job.status == status)
    return list(session.scalars(query))


def metrics_of(session: Session, job_id: str, *, after_epoch: int = 0) -> list[JobMetric]:
    query = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.epoch > after_epoch)
    return list(session.scalars(query.order_by(JobMetric.epoch)))


def metric_keys(session: Session, job_id: str) -> list[tuple[int, int]]:
    """(epoch, attempt that trained it) of each epoch of the job's history, in order."""
    query = select(JobMetric.epoch, JobMetric.attempt).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)
    return [(int(epoch), int(attempt)) for epoch, attempt in session.execute(query)]


def model_of(session: Session, job_id: str) -> Model | None:
    return session.scalars(select(Model).where(Model.job_id == job_id)).first()


def cancel(session: Session, job: Job) -> None:
    """Queued: cancelled at once. Running: the job process stops within a batch (the worker enforces it)."""
    if job.status == "queued":
        job.status, job.finished_at, job.message = "cancelled", utcnow(), "cancelled before it started"
    elif job.status == "running":
        job.cancel_requested = True
        job.message = "cancelling..."
    else:
        raise Conflict(f"job {job.id} is already {job.status}", code="not_cancellable")
    session.flush()


def resume(session: Session, storage: Storage, job: Job) -> bool:
    """Failed or cancelled -> queued again; it continues from its last checkpoint when there is one.
    Returns whether a checkpoint will be resumed from."""
    if job.status not in ("failed", "cancelled"):
        raise Conflict(
            f"only failed or cancelled jobs can be resumed; job {job.id} is {job.status}", code="not_resumable"
        )
    if job.dataset_id is None:
        raise Conflict(f"the dataset of job {job.id} was deleted; it cannot be resumed", code="dataset_deleted")
    has_checkpoint = (storage.path(job.run_key) / "last").exists()
    job.status, job.cancel_requested, job.error, job.error_code = "queued", False, None, None
    job.finished_at, job.eta_seconds = None, None
    job.message = (
        "waiting in the queue (resumes from the last checkpoint)" if has_checkpoint else "waiting in the queue"
    )
    session.flush()
    return has_checkpoint


def delete(session: Session, job: Job) -> str | None:
    """Delete a finished job's row; returns the run folder to remove after commit (None when a model
    still uses the files)."""
    if job.status not in FINISHED_STATUSES:
        raise Conflict(f"job {job.id} is {job.status}; cancel it first", code="job_active")
    keep_files = model_of(session, job.id) is not None
    key = job.run_key
    session.delete(job)
    session.flush()
    return None if keep_files else key
