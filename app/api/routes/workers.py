"""/api/v1/workers (admins): the worker registry — each worker's id, host, slots, devices, the ImageNet weights
it holds, its current jobs and its last heartbeat, judged on the database's clock."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.deps import AdminUser, SessionDep
from app.api.types import UtcDateTime
from app.services import workers as svc

router = APIRouter(prefix="/workers", tags=["workers"])


class WorkerOut(BaseModel):
    id: str = Field(description="random per process start (host and pid only describe it)")
    host: str
    pid: int
    state: Literal["running", "draining", "lost", "stopped"] = Field(
        description="lost: its lease lapsed without a goodbye (killed, crashed, cut off); its jobs are taken back"
    )
    slots: int = Field(description="jobs it runs at once")
    devices: list[str] = Field(
        description="GPU ids its jobs are pinned to; on a host without GPUs cpu:0..cpu:N-1, the processes one job "
        "may use there (FINETUNE_CPU_DEVICES). A job asks for at most this many devices"
    )
    weights: list[str] = Field(description="architectures whose ImageNet weights it holds")
    jobs: list[str] = Field(description="ids of the jobs it runs now")
    started_at: UtcDateTime
    heartbeat_at: UtcDateTime
    seconds_since_heartbeat: float = Field(description="on the database's clock")
    stopped_at: UtcDateTime | None


@router.get("", summary="Workers: live ones first, then those gone in the last day")
def list_workers(session: SessionDep, _admin: AdminUser) -> list[WorkerOut]:
    return [WorkerOut(**w.__dict__) for w in svc.registry(session)]
