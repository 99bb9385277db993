"""POST /api/v1/models/{model_id}/predict: top-k labels with probabilities for one or more images.

Nothing here blocks the event loop, and a request does as little as it can besides its forward pass: the
key and the model row come from a one-second in-process memory when this process saw them last (else from
the database, on the threadpool), a raw image body is read as it is, the images are decoded on the
threadpool (JPEGs at a reduced DCT scale), the model is loaded once by the cache, and the forward pass runs
on the batcher's thread, from a preallocated batch, together with the images of every other request to the
same model that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from app.api import bodies
from app.api.deps import PredictUser
from app.db.tables import Model
from app.domain_errors import NotFound
from app.errors import ApiError
from app.services import models as svc
from app.services import owned
from app.services.keycache import ModelRef, PredictLookups, Principal
from app.serving.cache import ModelCache
from app.settings import Settings
from app.storage import Storage
from finetune.errors import CheckpointError, ImageError
from finetune.explain import heatmap_png
from finetune.predict import Predictor

router = APIRouter(prefix="/models", tags=["predict"])

MAX_TOP_K = 100


class LabelOut(BaseModel):
    label: str
    index: int
    probability: float


class GradCamOut(BaseModel):
    label: str = Field(description="the class explained: the top label")
    index: int
    width: int = Field(description="the input image's width: the heat map has its size")
    height: int
    png: str = Field(
        description="base64 of an 8-bit greyscale PNG: per pixel, how much that part of the image raised the "
        "class's score (255: the most; 0: not at all, or outside the centre crop the model sees)"
    )


class ImagePrediction(BaseModel):
    label: str = Field(
        description="the top label, or `unknown` when its probability is below the model's threshold "
        "(`threshold` on the model: the owner's, else the one chosen on validation)"
    )
    labels: list[LabelOut] = Field(description="the `top_k` most likely labels, whatever `label` says")
    gradcam: GradCamOut | None = Field(None, description="with `explain=gradcam`: the Grad-CAM heat map")


class PredictOut(BaseModel):
    model_id: str
    predictions: list[ImagePrediction]


_IMAGE_SCHEMA = {"type": "string", "format": "binary"}


@router.post(
    "/{model_id}/predict",
    summary="Classify images",
    description="A multipart form with one or more `images` file parts, or one image as the raw body "
    "(`image/jpeg`, `image/png`, `image/webp`, `image/bmp`, `image/gif` or `application/octet-stream`). "
    "The answer has one entry per image, in order, each with its `label` and the `top_k` most likely labels "
    "(calibrated probabilities: over all classes they sum to 1). `label` is `unknown` when the top probability "
    "is below the model's threshold. `explain=gradcam` adds, per image, a Grad-CAM heat map of the input's "
    "size for the top label (a greyscale PNG, base64). A file that is not an acceptable image is refused "
    "with 422 `bad_image` and the reason; `details.index` says which.",
    responses={429: {"description": "`rate_limited`: too many predict requests by this user (see `Retry-After`)"}},
    response_model_exclude_none=True,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"images": {"type": "array", "items": _IMAGE_SCHEMA}},
                        "required": ["images"],
                    }
                },
                **{t: {"schema": _IMAGE_SCHEMA} for t in sorted(bodies.RAW_IMAGE_TYPES) if t != "image/jpg"},
            },
            "required": True,
        }
    },
)
async def predict(
    model_id: str,
    request: Request,
    user: PredictUser,
    top_k: Annotated[int, Query(ge=1, le=MAX_TOP_K, description="labels per image")] = 5,
    explain: Annotated[
        Literal["gradcam"] | None,
        Query(description="`gradcam`: add a Grad-CAM heat map of each image for its top label (slower)"),
    ] = None,
) -> PredictOut:
    state = request.app.state
    settings: Settings = state.settings
    request.app.state.rate_limits.predict.take(user.id, "predict")
    ref = await model_ref(state.predict_lookups, state.sessions, user, model_id)
    images = await bodies.read_images(request, settings.max_predict_bytes, settings.max_predict_images)
    cache: ModelCache = state.model_cache
    storage: Storage = state.storage
    try:
        folder = (
            storage.path(ref.run_key)
            if storage.store is None
            else await run_in_threadpool(storage.fetch_once, ref.run_key)
        )
        loaded = await cache.get(model_id, folder, ref.serving_precision)
    except CheckpointError:
        raise svc.unavailable(model_id) from None
    predictor = loaded.predictor
    with loaded.batcher.arriving():  # a batch that forms meanwhile waits for these images
        results = await asyncio.gather(
            *(run_in_threadpool(_preprocess, predictor, image, i) for i, image in enumerate(images)),
            return_exceptions=True,
        )
    for result in results:  # the first bad image in request order, whichever failed first
        if isinstance(result, BaseException):
            raise result
    arrays = [r for r in results if isinstance(r, np.ndarray)]
    probs = await loaded.probabilities(arrays)
    ranked = predictor.top_k(probs, top_k)
    answers = predictor.answer(probs, ref.threshold)
    heatmaps: list[GradCamOut | None] = [None] * len(arrays)
    if explain == "gradcam":
        for i, (image, labels) in enumerate(zip(images, ranked, strict=True)):
            heatmaps[i] = await run_in_threadpool(_gradcam, predictor, image, labels[0].index)
    return PredictOut(
        model_id=model_id,
        predictions=[
            ImagePrediction(label=answer, labels=[LabelOut(**p.to_dict()) for p in labels], gradcam=heat)
            for answer, labels, heat in zip(answers, ranked, heatmaps, strict=True)
        ],
    )


def _gradcam(predictor: Predictor, image: bodies.ReceivedImage, index: int) -> GradCamOut:
    """Blocking (a forward and a backward pass of the eager network): run on the threadpool."""
    heat, index = predictor.explain(image.data, index)
    height, width = heat.shape
    png = base64.b64encode(heatmap_png(heat)).decode()
    return GradCamOut(label=predictor.classes[index], index=index, width=width, height=height, png=png)


async def model_ref(lookups: PredictLookups, sessions: Any, user: Principal, model_id: str) -> ModelRef:
    """The model row as predict needs it: from this process's one-second memory, else the database. The
    owner check is made on every request, remembered or not."""

    def read() -> ModelRef:
        with sessions() as session:
            row = owned.by_id(session, Model, model_id)
            if row is None:
                raise NotFound("model", model_id)
            return ModelRef(row.id, row.owner_id, row.run_key, row.serving_precision, row.threshold)

    ref = await lookups.models.get_or_load(model_id, lambda: run_in_threadpool(read))
    if ref.owner_id != user.id and not user.is_admin:
        raise NotFound("model", model_id)
    return ref


def _preprocess(predictor: Predictor, image: bodies.ReceivedImage, index: int) -> np.ndarray:
    try:
        return predictor.preprocess(image.data)
    except ImageError as e:
        # The engine's own reason; which image it was goes in the details.
        raise ApiError(422, e.code, str(e), details={"index": index, "filename": image.filename}) from None
