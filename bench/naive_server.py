"""The reference serving arm: what a user writes first with FastAPI.

The model is loaded once at startup; each request decodes its image with PIL, applies the usual
torchvision eval transforms and runs the model at batch 1 (a sync endpoint, so FastAPI runs requests in
its threadpool). Same checkpoint, same preprocessing sizes as our service.

    python -m bench.naive_server RUN_DIR --port 8100
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import models, transforms


def create_app(run_dir: Path) -> FastAPI:
    from safetensors.torch import load_file

    best = (run_dir / "best").resolve()
    meta = json.loads((best / "meta.json").read_text())
    prep = meta["preprocessing"]
    model = getattr(models, meta["arch"])(weights=None, num_classes=meta["num_classes"])
    model.load_state_dict(load_file(str(best / "model.safetensors")))
    model.eval()
    transform = transforms.Compose(
        [
            transforms.Resize(prep["resize_size"]),
            transforms.CenterCrop(prep["crop_size"]),
            transforms.ToTensor(),
            transforms.Normalize(prep["mean"], prep["std"]),
        ]
    )
    classes = meta["class_names"]
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict[str, object]:
        img = Image.open(io.BytesIO(file.file.read())).convert("RGB")
        x = transform(img).unsqueeze(0)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)[0]
        top = probs.topk(min(5, len(classes)))
        return {"labels": [{"label": classes[int(i)], "probability": float(p)} for p, i in zip(*top, strict=True)]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(create_app(args.run_dir), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
