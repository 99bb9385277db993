"""Jobs: creation (validated by the engine's own rules), cancel, resume, delete, and reading progress."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, create_model, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import FINISHED_STATUSES, Dataset, Job, JobMetric, JobStatus, Model, User, Worker, new_id
from app.domain_errors import Conflict, LimitReached
from app.jobs import state
from app.services import owned
from app.settings import Settings
from app.storage import Storage
from finetune import weights as engine_weights
from finetune.config import TrainConfig
from finetune.errors import InputError, WeightsNotCachedError


class TooManyDevices(InputError):
    """A job asks for more devices than any worker offers (422)."""

    code = "too_many_devices"


# Settings a user never chooses for a server-side job: where data and runs live, which device.
SERVER_OWNED = {"data", "out", "cache_dir", "cache_max_bytes", "split_file", "weights_dir", "device"}
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
        if base == "float | str":  # a rate or "auto" (the engine's range test picks it): one error, at the field
            py, constraints = _rate_type(meta["min"], meta["max"]), {}
        annotation = py | None if "None" in str(f.type) else py
        fields[f.name] = (annotation, Field(f.default, description=meta.get("help"), **constraints))
    return fields


def _rate_type(lo: float, hi: float) -> Any:
    def check(value: Any) -> float | str:
        if value == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise ValueError(f"must be a number between {lo:g} and {hi:g}, or auto; got {value!r}")
        return float(value)

    schema = {"anyOf": [{"type": "number", "minimum": lo, "maximum": hi}, {"const": "auto"}]}
    return Annotated[float | str, PlainValidator(check), WithJsonSchema(schema)]


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
    return TrainConfig(**values, data="<dataset>", out="<run>").validate()


def check_weights(session: Session, config: TrainConfig, settings: Settings) -> str | None:
    """ImageNet weights are checked where the job will run: on the workers, which advertise the weights they
    hold. Refused (422, the engine's message and command) when live workers exist and none holds them; with
    no live worker, one host checks its own folder (the worker shares it), and several hosts accept the job:
    it waits, and says so, until a worker with the weights takes it. Returns that waiting message, or None."""
    if config.weights != "imagenet":
        return None
    live = session.execute(select(Worker.id, Worker.host, Worker.weights).where(state.worker_alive())).all()
    if any(config.model in (w.weights or []) for w in live):
        return None
    if live:
        hosts = ", ".join(sorted({w.host for w in live}))
        raise WeightsNotCachedError(
            f"no running worker holds the ImageNet weights of {config.model} (workers on: {hosts}): run "
            f"`finetune weights fetch {config.model}` (or `finetune weights import {config.model} FILE`) on a "
            "worker host; workers look for new weights every minute. Or use weights=none.",
        )
    if not settings.is_multi_host:
        # Refused now, with the engine's message and command, rather than failed later in the worker.
        engine_weights.cached_imagenet_path(config.model, settings.weights_dir)
        return None
    return f"waiting for a worker that holds the ImageNet weights of {config.model}"


def worker_capacity(devices: list[Any], *, gpus_only: bool = False) -> int:
    """How many devices one job may use on a worker that advertises ``devices``: its GPUs, or on a host
    without GPUs its ``cpu:N`` entries (``cpu_devices``); a worker registered before either counts as 1.
    ``gpus_only``: its GPUs alone (a job that needs CUDA, such as one with ``sync_batchnorm``)."""
    if gpus_only:
        return sum(1 for d in devices or [] if not str(d).startswith("cpu"))
    return max(1, len(devices or []))


def this_host_devices(settings: Settings) -> list[str]:
    """What a worker on this host advertises (``nvidia-smi -L`` or CUDA_VISIBLE_DEVICES: no CUDA here)."""
    from app.jobs.worker import advertised_devices

    return advertised_devices(settings)


def check_devices(session: Session, config: TrainConfig, settings: Settings) -> None:
    """A job for several devices needs a worker that has them: refused (422, with what the workers offer)
    when no live worker does. With no live worker, one host checks what a worker here would offer; several
    hosts accept the job (a bigger worker may start)."""
    if config.devices <= 1:
        return
    gpus = config.sync_batchnorm  # SyncBatchNorm runs on CUDA only: the gloo processes of a CPU host do not count
    live = session.execute(select(Worker.host, Worker.devices).where(state.worker_alive())).all()
    if live:
        offers = {(w.host, worker_capacity(w.devices, gpus_only=gpus)) for w in live}
    elif not settings.is_multi_host:
        offers = {("this host", worker_capacity(this_host_devices(settings), gpus_only=gpus))}
    else:
        return
    most = max(n for _, n in offers)
    if config.devices > most:
        where = ", ".join(f"{host}: {n}" for host, n in sorted(offers))
        if gpus:
            raise TooManyDevices(
                f"devices={config.devices} with sync_batchnorm needs that many GPUs on one worker, and no running "
                f"worker has them (GPUs per worker: {where}). SyncBatchNorm runs on GPUs only: leave it out to "
                "train on a worker's CPU processes."
            )
        raise TooManyDevices(
            f"devices={config.devices}, but no running worker has that many (devices per worker: {where}). "
            f"Ask for at most {most}; a worker without GPUs offers FINETUNE_CPU_DEVICES processes."
        )


def create_job(session: Session, owner: User, dataset: Dataset, config: TrainConfig, settings: Settings) -> Job:
    """Add the queued job, unless the owner already has as many queued jobs as a user may (429). The cap
    holds under concurrent submits: the count and the insert are one statement (see ``state.create``)."""
    if dataset.status != "ready":
        detail = "is still being checked" if dataset.status == "checking" else "was refused"
        raise Conflict(f"dataset {dataset.id} {detail}: train on a ready dataset", code="dataset_not_ready")
    waiting = check_weights(session, config, settings)
    check_devices(session, config, settings)
    job_id = new_id()
    stored = {k: v for k, v in config.to_dict().items() if k not in SERVER_OWNED}
    values = {
        "id": job_id,
        "owner_id": owner.id,
        "dataset_id": dataset.id,
        "config": stored,
        "arch": config.model,
        "weights": config.weights,
        "strategy": config.resolved_strategy(),
        "run_key": Storage.run_key(job_id),
        "message": waiting or "waiting in the queue",
        "progress": 0.0,
        "epoch": 0,
        "total_epochs": 0,
        "attempt": 0,
        "retries": 0,
        "cancel_requested": False,
        "created_at": state.db_now(),
        "updated_at": state.db_now(),
    }
    if not state.create(session, values, settings.max_queued_jobs_per_user):
        raise _queue_full(session, owner.id, settings)
    job = session.get(Job, job_id)
    assert job is not None
    return job


def _queue_full(session: Session, owner_id: str, settings: Settings) -> LimitReached:
    cap = settings.max_queued_jobs_per_user
    queued = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status == JobStatus.QUEUED)
    )
    return LimitReached(
        f"{queued} jobs of this user are queued, the most allowed (max_queued_jobs_per_user = {cap}): "
        "wait for some to start, or cancel some",
        code="too_many_queued_jobs",
        details={"queued": queued, "max_queued_jobs_per_user": cap},
    )


def get_owned(session: Session, owner: User, job_id: str) -> Job:
    return owned.get_owned(session, owner, Job, job_id, "job")


def list_owned(session: Session, owner: User, status: str | None = None) -> list[Job]:
    query = owned.owned_query(owner, Job)
    if status:
        query = query.where(Job.status == JobStatus(status))
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


def cancel(session: Session, job: Job) -> Job:
    """Queued: cancelled at once. Running: its process stops within a batch and records the cancel (the
    worker enforces it). A job that ended meanwhile is a 409."""
    outcome = state.request_cancel(session, job.id)
    session.refresh(job)
    if outcome is state.CancelOutcome.FINISHED:
        raise Conflict(f"job {job.id} is already {job.status}", code="not_cancellable")
    return job


def resume(session: Session, storage: Storage, job: Job, settings: Settings) -> bool:
    """Failed or cancelled -> queued again; it continues from its last checkpoint when there is one.
    Returns whether a checkpoint will be resumed from. 409 when the job is not (or no longer) failed or
    cancelled, 429 when its owner's queue is full."""
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise _not_resumable(job)
    if job.dataset_id is None:
        raise Conflict(f"the dataset of job {job.id} was deleted; it cannot be resumed", code="dataset_deleted")
    has_checkpoint = storage.exists(f"{job.run_key}/last")
    message = "waiting in the queue (resumes from the last checkpoint)" if has_checkpoint else "waiting in the queue"
    if not state.resume(session, job.id, job.owner_id, message, settings.max_queued_jobs_per_user):
        session.refresh(job)
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise _not_resumable(job)  # resumed or deleted by another request meanwhile
        raise _queue_full(session, job.owner_id, settings)
    session.refresh(job)
    return has_checkpoint


def _not_resumable(job: Job) -> Conflict:
    return Conflict(f"only failed or cancelled jobs can be resumed; job {job.id} is {job.status}", code="not_resumable")


def delete(session: Session, job: Job) -> str | None:
    """Delete a finished job's row; returns the run folder to remove after commit (None when a model
    still uses the files). Conditional on its status, so a job resumed meanwhile is not deleted (409)."""
    if job.status not in FINISHED_STATUSES:
        raise Conflict(f"job {job.id} is {job.status}; cancel it first", code="job_active")
    keep_files = model_of(session, job.id) is not None
    key = job.run_key
    if not state.delete_finished(session, job.id):
        session.refresh(job)
        raise Conflict(f"job {job.id} is {job.status}; cancel it first", code="job_active")
    session.expunge(job)
    return None if keep_files else key
