"""POST /api/v1/models/{model_id}/predict: top-k labels with probabilities for one or more images.

Nothing here blocks the event loop: the row is read and the images are decoded on the threadpool, the
model is loaded once by the cache, and the forward pass runs on the batcher's thread together with the
images of every other request to the same model that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from app.api import bodies
from app.api.deps import CurrentUser, SessionDep, SettingsDep, StorageDep
from app.api.routes.models import ModelCacheDep
from app.errors import ApiError
from app.services import models as svc
from finetune.errors import CheckpointError, ImageError
from finetune.predict import Predictor

router = APIRouter(prefix="/models", tags=["predict"])

MAX_TOP_K = 100


class LabelOut(BaseModel):
    label: str
    index: int
    probability: float


class ImagePrediction(BaseModel):
    labels: list[LabelOut]


class PredictOut(BaseModel):
    model_id: str
    predictions: list[ImagePrediction]


_IMAGE_SCHEMA = {"type": "string", "format": "binary"}


@router.post(
    "/{model_id}/predict",
    summary="Classify images",
    description="A multipart form with one or more `images` file parts, or one image as the raw body "
    "(`image/jpeg`, `image/png`, `image/webp`, `image/bmp`, `image/gif` or `application/octet-stream`). "
    "The answer has one entry per image, in order, each with the `top_k` most likely labels "
    "(probabilities over all classes sum to 1). A file that is not an acceptable image is refused "
    "with 422 `bad_image` and the reason; `details.index` says which.",
    responses={429: {"description": "`rate_limited`: too many predict requests by this user (see `Retry-After`)"}},
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
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    user: CurrentUser,
    cache: ModelCacheDep,
    top_k: Annotated[int, Query(ge=1, le=MAX_TOP_K, description="labels per image")] = 5,
) -> PredictOut:
    request.app.state.rate_limits.predict.take(user.id, "predict")

    def lookup() -> str:
        model = svc.get_owned(session, user, model_id)
        session.commit()  # the connection goes back to the pool now, not after the forward pass
        return model.run_key

    run_key = await run_in_threadpool(lookup)
    images = await bodies.read_images(request, settings.max_predict_bytes, settings.max_predict_images)
    try:
        folder = (
            storage.path(run_key) if storage.store is None else await run_in_threadpool(storage.fetch_once, run_key)
        )
        loaded = await cache.get(model_id, folder)
    except CheckpointError:
        raise svc.unavailable(model_id) from None
    predictor = loaded.predictor
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
    return PredictOut(
        model_id=model_id,
        predictions=[ImagePrediction(labels=[LabelOut(**p.to_dict()) for p in labels]) for labels in ranked],
    )


def _preprocess(predictor: Predictor, image: bodies.ReceivedImage, index: int) -> np.ndarray:
    try:
        return predictor.preprocess(image.data)
    except ImageError as e:
        # The engine's own reason; which image it was goes in the details.
        raise ApiError(422, e.code, str(e), details={"index": index, "filename": image.filename}) from None
