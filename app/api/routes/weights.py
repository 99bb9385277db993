"""GET /api/v1/weights: which architectures have their ImageNet weights on this server, so a UI or a
client can tell before starting a job (the server never downloads them by itself)."""

from __future__ import annotations

import shlex
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.api.deps import CurrentUser, SettingsDep
from finetune import weights as engine_weights
from finetune.models import ARCHITECTURES

router = APIRouter(prefix="/weights", tags=["weights"])


class WeightsOut(BaseModel):
    arch: str
    pretrained: bool = Field(description="whether the architecture has ImageNet weights at all (lenet has none)")
    weights: str | None = Field(
        default=None, description="torchvision's weights entry, e.g. ResNet18_Weights.IMAGENET1K_V1"
    )
    filename: str | None = None
    folder: str | None = Field(default=None, description="where this server looks for the file")
    url: str | None = None
    present: bool = False
    size: int | None = None
    verified: bool | None = Field(
        default=None, description="the file matches torchvision's published hash; null when absent or not checked"
    )
    accepted_unverified: bool = Field(
        default=False, description="imported with --accept-unverified by an administrator"
    )
    usable: bool = Field(description="a job with weights=imagenet can start with this file")
    fetch_command: str | None = Field(default=None, description="run where the internet is reachable (when not usable)")
    import_command: str | None = Field(default=None, description="for a file downloaded elsewhere (when not usable)")


@router.get("", summary="ImageNet weights on this server, per architecture")
def list_weights(
    settings: SettingsDep,
    _user: CurrentUser,
    verify: Annotated[
        bool, Query(description="check each present file's SHA-256 (remembered per file once computed)")
    ] = True,
) -> list[WeightsOut]:
    # Hashing is blocking file I/O: a sync route, so it runs on the threadpool.
    statuses = {s.arch: s for s in engine_weights.status_all(settings.weights_dir, verify=verify)}
    dir_option = f" --dir {shlex.quote(str(settings.weights_dir))}" if settings.weights_dir else ""
    out: list[WeightsOut] = []
    for arch in ARCHITECTURES:
        s = statuses.get(arch)
        if s is None:
            out.append(WeightsOut(arch=arch, pretrained=False, usable=False))
            continue
        usable = s.present and (s.verified is not False or s.accepted_unverified)
        out.append(
            WeightsOut(
                arch=arch,
                pretrained=True,
                weights=s.weights,
                filename=s.filename,
                folder=str(engine_weights.weights_file(arch, settings.weights_dir).path.parent),
                url=s.url,
                present=s.present,
                size=s.size,
                verified=s.verified,
                accepted_unverified=s.accepted_unverified,
                usable=usable,
                fetch_command=None if usable else f"finetune weights fetch {arch}{dir_option}",
                import_command=None if usable else f"finetune weights import {arch} FILE{dir_option}",
            )
        )
    return out
