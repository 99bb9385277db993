"""/api/v1/jobs: create (202), list, get, cancel, resume, delete, and live progress as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from app.api.deps import CurrentUser, SessionDep, SettingsDep, StorageDep
from app.api.types import UtcDateTime
from app.db.tables import FINISHED_STATUSES, JOB_STATUSES, Job, JobMetric, JobStatus
from app.services import datasets as dataset_svc
from app.services import jobs as svc

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0


class MetricOut(BaseModel):
    epoch: int
    attempt: int  # the attempt that trained this epoch
    stage: str
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    images_per_sec: float
    epoch_time: float
    is_best: bool


class JobOut(BaseModel):
    id: str
    dataset_id: str | None
    status: JobStatus
    model: str
    weights: str
    strategy: str
    config: dict[str, Any]
    stage: str | None
    message: str | None
    progress: float
    epoch: int
    total_epochs: int
    eta_seconds: float | None
    images_per_sec: float | None
    attempt: int
    retries: int = Field(description="automatic retries after its process or worker died (capped)")
    retry_reason: str | None = Field(description="why the last automatic retry happened")
    error: str | None
    error_code: str | None
    cancel_requested: bool
    created_at: UtcDateTime
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None
    model_id: str | None = None
    metrics: list[MetricOut] | None = None
    # The split the run trains on, once its data is checked: "source" recorded (the dataset's own split),
    # drawn (its own seed and fractions) or folders; "counts" per class and split, "totals" per split.
    split: dict[str, Any] | None = None
    # What the run decided itself, once it did: "defaults" [{setting, value, reason}] for the settings left
    # open, "lr_finder" {lr, method, lrs, losses} for lr auto, "budget" {epochs, estimated_seconds, reason...}.
    choices: dict[str, Any] | None = None


def metric_out(m: JobMetric) -> MetricOut:
    return MetricOut(
        epoch=m.epoch,
        attempt=m.attempt,
        stage=m.stage,
        train_loss=m.train_loss,
        train_acc=m.train_acc,
        val_loss=m.val_loss,
        val_acc=m.val_acc,
        lr=m.lr,
        images_per_sec=m.images_per_sec,
        epoch_time=m.epoch_time,
        is_best=m.is_best,
    )


def job_out(job: Job, metrics: list[JobMetric] | None = None, model_id: str | None = None) -> JobOut:
    return JobOut(
        id=job.id,
        dataset_id=job.dataset_id,
        status=job.status,
        model=job.arch,
        weights=job.weights,
        strategy=job.strategy,
        config=job.config,
        stage=job.stage,
        message=job.message,
        progress=job.progress,
        epoch=job.epoch,
        total_epochs=job.total_epochs,
        eta_seconds=job.eta_seconds,
        images_per_sec=job.images_per_sec,
        attempt=job.attempt,
        retries=job.retries,
        retry_reason=job.retry_reason,
        error=job.error,
        error_code=job.error_code,
        split=job.data_split,
        choices=job.run_choices,
        cancel_requested=job.cancel_requested,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        model_id=model_id,
        metrics=[metric_out(m) for m in metrics] if metrics is not None else None,
    )


@router.post(
    "",
    status_code=202,
    summary="Start a fine-tuning job",
    description="Queues a job; the response is the job (status `queued`). Hyperparameters are checked "
    "against the engine's ranges; a job asking for ImageNet weights the server does not have is refused "
    "with the command that fetches them. Fields the server decides (`status`, `owner_id`, `id`, paths, "
    "`device`...) are ignored when sent; any other unknown field is refused with 422.",
    responses={429: {"description": "`too_many_queued_jobs`: the user has `max_queued_jobs_per_user` jobs queued"}},
)
def create_job(
    body: svc.JobCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
) -> JobOut:
    dataset = dataset_svc.get_owned(session, user, body.dataset_id)
    config = svc.validate_request(body, settings)
    job = svc.create_job(session, user, dataset, config, settings)
    session.commit()  # the row is the truth: it exists before the queue hears of it
    _enqueue(request, job.id)
    return job_out(job)


def _enqueue(request: Request, job_id: str) -> None:
    """Ring the queue's doorbell. The job is committed already: if the queue cannot be reached, the workers'
    sweep for queued jobs without a message sends one later, so the client still gets its 202."""
    try:
        request.app.state.queue.enqueue(job_id)
    except Exception:
        log.exception("could not enqueue job %s; a worker will send its message later", job_id)


@router.get("", summary="List jobs")
def list_jobs(
    session: SessionDep,
    user: CurrentUser,
    status: str | None = Query(
        None, description="filter: " + ", ".join(JOB_STATUSES), pattern="^(" + "|".join(JOB_STATUSES) + ")$"
    ),
) -> list[JobOut]:
    return [job_out(j) for j in svc.list_owned(session, user, status)]


@router.get("/{job_id}", summary="Get a job: status, progress, epoch, metrics history, ETA, error")
def get_job(job_id: str, session: SessionDep, user: CurrentUser) -> JobOut:
    job = svc.get_owned(session, user, job_id)
    model = svc.model_of(session, job.id)
    return job_out(job, svc.metrics_of(session, job.id), model.id if model else None)


@router.post("/{job_id}/cancel", summary="Cancel a queued or running job")
def cancel_job(job_id: str, session: SessionDep, user: CurrentUser) -> JobOut:
    job = svc.cancel(session, svc.get_owned(session, user, job_id))
    session.commit()  # before the answer: the session dependency would commit only after it is sent
    return job_out(job)


@router.post("/{job_id}/resume", status_code=202, summary="Resume a failed or cancelled job from its last checkpoint")
def resume_job(
    job_id: str, request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep, user: CurrentUser
) -> JobOut:
    job = svc.get_owned(session, user, job_id)
    svc.resume(session, storage, job, settings)  # the job's owner's cap: an admin may resume it
    session.commit()
    _enqueue(request, job.id)
    return job_out(job)


@router.delete("/{job_id}", status_code=204, summary="Delete a finished job (its model, if any, is kept)")
def delete_job(job_id: str, session: SessionDep, storage: StorageDep, user: CurrentUser) -> Response:
    key = svc.delete(session, svc.get_owned(session, user, job_id))
    session.commit()
    if key:
        storage.delete(key)
    return Response(status_code=204)


@router.get(
    "/{job_id}/events",
    summary="Live progress as Server-Sent Events",
    response_class=StreamingResponse,
    description="Events: `reset` (first, and again whenever the epoch history is rewritten: a new attempt "
    "resumed from an earlier checkpoint and dropped the dead attempt's later epochs; carries the job's "
    "`attempt` and every current epoch as `metrics`, which replace all a client holds), `metric` (one per "
    "newly finished epoch), `job` (the job without metrics, whenever it changes), `end` (the job finished). "
    "Every metric carries the attempt that trained it. A reconnect starts again with a `reset`.",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(job_id: str, request: Request, session: SessionDep, user: CurrentUser) -> StreamingResponse:
    svc.get_owned(session, user, job_id)  # 404 before the stream starts
    # The request's session would otherwise hold a pooled connection (and a transaction) for as long as
    # someone watches; the stream polls with short sessions of its own.
    session.close()
    sessions = request.app.state.sessions

    def snapshot(held: list[tuple[int, int]] | None) -> tuple[JobOut, bool, list[MetricOut]]:
        """The job; whether the client must drop what it holds (``held``: the (epoch, attempt) of each metric
        it has); and the metrics to send: all of them after a reset, else the epochs after its last."""
        with sessions() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise LookupError(job_id)
            model = svc.model_of(s, job_id)
            # Only the keys of the whole history are compared at each poll, not the whole rows.
            reset = held is None or svc.metric_keys(s, job_id)[: len(held)] != held
            after = 0 if reset or not held else held[-1][0]
            metrics = [metric_out(m) for m in svc.metrics_of(s, job_id, after_epoch=after)]
            return job_out(job, model_id=model.id if model else None), reset, metrics

    async def stream() -> AsyncIterator[str]:
        last_job: str | None = None
        held: list[tuple[int, int]] | None = None  # (epoch, attempt) of each metric the client holds
        idle = 0.0
        while not await request.is_disconnected():
            try:
                job, reset, metrics = await run_in_threadpool(snapshot, held)
            except LookupError:
                yield _sse("end", {"id": job_id, "status": "deleted"})
                return
            if reset:
                # The first answer, or a history the client must drop part of: the epochs after the checkpoint
                # a new attempt resumed from are gone, or trained again by it.
                held = []
                yield _sse("reset", {"attempt": job.attempt, "metrics": [m.model_dump() for m in metrics]})
            else:
                for m in metrics:
                    yield _sse("metric", m.model_dump())
            held = (held or []) + [(m.epoch, m.attempt) for m in metrics]
            payload = job.model_dump_json()
            if payload != last_job:
                last_job = payload
                idle = 0.0
                yield f"event: job\ndata: {payload}\n\n"
            if job.status in FINISHED_STATUSES:
                yield _sse("end", {"id": job_id, "status": job.status})
                return
            await asyncio.sleep(SSE_POLL_SECONDS)
            idle += SSE_POLL_SECONDS
            if idle >= SSE_KEEPALIVE_SECONDS:
                idle = 0.0
                yield ": keep-alive\n\n"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"
