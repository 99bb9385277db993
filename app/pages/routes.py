"""Server-rendered pages: home, dataset upload and report, new job, the live job page, the model page.

Pages read rows through the same services (and owner checks) as the API and render Jinja2 templates with
autoescape always on: every user-supplied string (dataset names, class names, file paths) is escaped.
Everything interactive is small same-origin JavaScript calling ``/api/v1``. No page loads anything from
another origin: the chart library is served from ``settings.assets_dir`` (node_modules), never a CDN,
and a Content-Security-Policy header tells the browser so.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from app.api.deps import SessionDep, SettingsDep, StorageDep
from app.api.routes.jobs import job_out  # the job page seeds its charts with exactly the API's JSON
from app.db.tables import DATASET_STATUSES, FINISHED_STATUSES, Dataset, Job, JobStatus
from app.domain_errors import NotFound
from app.errors import error_body
from app.pages.login import LoginRequired, PageUser
from app.pages.login import router as login_router
from app.services import datasets as dataset_svc
from app.services import exports as export_svc
from app.services import jobs as job_svc
from app.services import models as model_svc
from finetune import weights as engine_weights
from finetune.config import TrainConfig, hyperparameters
from finetune.models import MIN_IMAGE_SIZE, MIN_IMAGE_SIZE_DEFAULT, default_image_size

APP_DIR = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = APP_DIR / "templates"
STATIC_DIR = APP_DIR / "static"
CHART_JS = Path("chart.js") / "dist" / "chart.umd.js"
CHART_JS_URL = "/static/vendor/chart.umd.js"

# Same-origin only. Inline styles are allowed for server-computed widths and heat-map colours; scripts
# never run inline (page data travels in <script type="application/json"> blocks, which do not execute).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}

# The settings shown on the new-job form; every other tunable setting goes under "Advanced".
MAIN_SETTINGS = (
    "epochs",
    "budget_minutes",
    "head_epochs",
    "batch_size",
    "devices",
    "lr",
    "image_size",
    "optimizer",
    "schedule",
    "weight_decay",
    "label_smoothing",
    "early_stopping",
)
FORM_SKIPPED = {*job_svc.SERVER_OWNED, "model", "weights", "strategy"}
ARCH_NOTES = {
    "alexnet": "AlexNet (2012): 61M parameters, quick but less accurate",
    "googlenet": "GoogLeNet / Inception v1: 6.6M parameters, good accuracy per FLOP",
    "resnet18": "ResNet-18: 11.7M parameters, the fast default",
    "resnet34": "ResNet-34: 21.8M parameters",
    "resnet50": "ResNet-50: 25.6M parameters, more accurate, slower",
    "resnet101": "ResNet-101: 44.5M parameters",
    "resnet152": "ResNet-152: 60.2M parameters, the largest",
    "lenet": "LeNet-5: tiny, 32 px images, no pretrained weights; for quick experiments",
}
FIELD_LABELS = {
    "lr": "Learning rate",
    "batch_size": "Batch size (per device)",
    "devices": "Devices (GPUs)",
    "image_size": "Image size (px)",
    "head_epochs": "Head epochs",
    "backbone_lr_mult": "Backbone LR multiplier",
    "hflip": "Horizontal flips",
    "crop_scale_min": "Min crop scale",
    "budget_minutes": "Time budget (minutes)",
    "val_fraction": "Validation fraction",
    "channels_last": "Channels-last layout",
    "compile": "torch.compile",
}
STATUS_LABELS = {
    **{status.value: status.value.capitalize() for status in JobStatus},
    **{status: status.capitalize() for status in DATASET_STATUSES},
}


DASH = "\u2013"  # shown for a missing number


# -- templates ------------------------------------------------------------------------------------------
def _pct(value: Any, digits: int = 1) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return DASH
    return f"{value * 100:.{digits}f}%"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return DASH
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def _duration(seconds: Any) -> str:
    if seconds is None:
        return DASH
    s = max(0, round(float(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _seconds(value: Any) -> str:
    """An epoch's time: seconds with a decimal under a minute, else m:ss."""
    if value is None:
        return DASH
    return f"{float(value):.1f} s" if float(value) < 60 else _duration(value)


def _filesize(size: Any) -> str:
    size = float(size or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


def _iso(value: datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:  # SQLite hands naive datetimes back; they were written in UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def _when(value: datetime | None) -> str:
    if value is None:
        return DASH
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _heat(count: int, total: int) -> str:
    """Inline style of a confusion-matrix cell: blue with opacity by the share of its row."""
    share = count / total if total else 0.0
    colour = "#fff" if share > 0.55 else "inherit"
    return f"background-color: rgba(37, 99, 235, {share:.3f}); color: {colour}"


def _make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # always, whatever the file name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        pct=_pct, num=_num, duration=_duration, seconds=_seconds, filesize=_filesize, iso=_iso, when=_when
    )
    env.globals.update(heat=_heat, status_labels=STATUS_LABELS, chart_js_url=CHART_JS_URL)
    return Jinja2Templates(env=env)


templates = _make_templates()
router = APIRouter(include_in_schema=False)


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code, headers=PAGE_HEADERS)


def not_found_page(request: Request, kind: str, ident: str) -> HTMLResponse:
    return render(request, "not_found.html", {"kind": kind, "ident": ident, "title": "Not found"}, 404)


def _headline(evaluation: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The split a model is judged on (test when it has images, else validation) and its metrics."""
    for split in ("test", "val"):
        m = evaluation.get(split) or {}
        if m.get("count"):
            return split, m
    return None, {}


# -- pages ----------------------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep, user: PageUser) -> HTMLResponse:
    datasets = dataset_svc.list_owned(session, user)
    jobs = job_svc.list_owned(session, user)
    models = model_svc.list_owned(session, user)
    names = {d.id: d.name for d in datasets}
    return render(
        request,
        "home.html",
        {
            "title": "Home",
            "datasets": datasets,
            "jobs": jobs,
            "dataset_names": names,
            "models": [(m, *_headline(m.evaluation or {})) for m in models],
        },
    )


@router.get("/datasets/new", response_class=HTMLResponse)
def new_dataset(request: Request, settings: SettingsDep, user: PageUser) -> HTMLResponse:
    return render(
        request,
        "dataset_new.html",
        {
            "title": "Upload a dataset",
            "max_upload_bytes": settings.max_upload_bytes,
            "max_upload_files": settings.max_upload_files,
        },
    )


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse)
def dataset_page(
    dataset_id: str, request: Request, session: SessionDep, storage: StorageDep, user: PageUser
) -> HTMLResponse:
    try:
        dataset = dataset_svc.get_owned(session, user, dataset_id)
    except NotFound:
        return not_found_page(request, "dataset", dataset_id)
    if dataset.status == "checking" and request.app.state.dataset_checks.sweep():
        session.refresh(dataset)
    indices = dataset_svc.thumbnail_indices(storage, dataset) if dataset.status == "ready" else {}
    thumbnails = {c: [f"/api/v1/datasets/{dataset.id}/thumbnails/{i}" for i in idx] for c, idx in indices.items()}
    jobs = list(session.scalars(select(Job).where(Job.dataset_id == dataset.id).order_by(Job.created_at.desc())))
    report = dataset.report or {}
    return render(
        request,
        "dataset.html",
        {
            "title": dataset.name,
            "dataset": dataset,
            "report": report,
            "counts": report.get("counts", {}),
            "totals": report.get("split_totals", {}),
            "thumbnails": thumbnails,
            "jobs": jobs,
            **_check_progress(dataset.progress),
        },
    )


def _check_progress(progress: dict[str, Any] | None) -> dict[str, Any]:
    """The phase of an upload's check in words, and how far it is (0..1)."""
    p = progress or {}
    phase, done, total = p.get("phase", "queued"), int(p.get("done", 0)), int(p.get("total", 0))
    text = {
        "queued": "Waiting for a free checker…",
        "extracting": f"Extracting the zip: {done} of {total} files",
        "checking": f"Checking every image: {done} of {total}",
        "storing": "Storing the dataset…",
    }.get(phase, "Checking…")
    return {"check_phase": text, "check_fraction": done / total if total else 0.0}


def _form_field(hp: dict[str, Any]) -> dict[str, Any]:
    """A hyperparameter as the form renders it: input kind, bounds, step, placeholder."""
    field = dict(hp)
    if hp["choices"]:
        field["kind"] = "select"
    elif hp["type"] == "bool":
        field["kind"] = "tristate" if hp["optional"] else "checkbox"
    elif hp["type"] in ("int", "float"):
        field["kind"] = "number"
        field["step"] = "1" if hp["type"] == "int" else "any"
    else:
        field["kind"] = "text"
    field["label"] = FIELD_LABELS.get(hp["name"], hp["name"].replace("_", " ").capitalize())
    field["value"] = "" if hp["default"] is None else hp["default"]
    return field


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: PageUser,
    dataset: str | None = Query(None, description="the dataset to preselect"),
) -> HTMLResponse:
    datasets = [d for d in dataset_svc.list_owned(session, user) if d.status == "ready"]
    status = {s.arch: s for s in engine_weights.status_all(settings.weights_dir, verify=False)}
    fields = TrainConfig.__dataclass_fields__
    architectures = []
    for arch in fields["model"].metadata["choices"]:
        s = status.get(arch)
        architectures.append(
            {
                "name": arch,
                "note": ARCH_NOTES.get(arch, ""),
                "pretrainable": s is not None,
                "present": bool(s and s.present),
                "filename": s.filename if s else "",
                "folder": str(Path(s.path).parent) if s else "",
                "fetch": f"finetune weights fetch {arch}" if s else "",
                "image_size": default_image_size(arch),
                "min_image_size": MIN_IMAGE_SIZE.get(arch, MIN_IMAGE_SIZE_DEFAULT),
            }
        )
    default_arch = fields["model"].default
    if not any(a["name"] == default_arch and a["present"] for a in architectures):
        present = [a["name"] for a in architectures if a["present"]]
        default_arch = present[0] if present else default_arch
    hps = [_form_field(hp) for hp in hyperparameters() if hp["name"] not in FORM_SKIPPED]
    by_name = {f["name"]: f for f in hps}
    selected = dataset if dataset and any(d.id == dataset for d in datasets) else (datasets[0].id if datasets else None)
    return render(
        request,
        "job_new.html",
        {
            "title": "Train a model",
            "datasets": datasets,
            "selected_dataset": selected,
            "unknown_dataset": bool(dataset) and selected != dataset,
            "architectures": architectures,
            "default_arch": default_arch,
            "strategies": fields["strategy"].metadata["choices"],
            "strategy_help": fields["strategy"].metadata["help"],
            "main_fields": [by_name[n] for n in MAIN_SETTINGS if n in by_name],
            "advanced_fields": [f for f in hps if f["name"] not in MAIN_SETTINGS],
        },
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, session: SessionDep, user: PageUser) -> HTMLResponse:
    try:
        job = job_svc.get_owned(session, user, job_id)
    except NotFound:
        return not_found_page(request, "job", job_id)
    metrics = job_svc.metrics_of(session, job.id)
    model = job_svc.model_of(session, job.id)
    dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
    out = job_out(job, metrics, model.id if model else None)
    return render(
        request,
        "job.html",
        {
            "title": f"Job {job.id[:8]}",
            "job": job,
            "metrics": metrics,
            "model": model,
            "dataset": dataset,
            "finished": job.status in FINISHED_STATUSES,
            "job_json": out.model_dump(mode="json"),
            "config_items": _config_items(job.config),
        },
    )


def _config_items(config: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """(name, value, differs from the default) for every stored setting, in the engine's order."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    ordered = [n for n in defaults if n in config] + sorted(n for n in config if n not in defaults)
    return [(n, config[n], n in defaults and config[n] != defaults[n]) for n in ordered]


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(
    model_id: str,
    request: Request,
    session: SessionDep,
    user: PageUser,
    split: str | None = Query(None, pattern="^(val|test)$", description="the split whose details are shown"),
) -> HTMLResponse:
    try:
        model = model_svc.get_owned(session, user, model_id)
    except NotFound:
        return not_found_page(request, "model", model_id)
    evaluation = model.evaluation or {}
    headline_split, _ = _headline(evaluation)
    splits = [s for s in ("test", "val") if (evaluation.get(s) or {}).get("count")]
    shown = split if split in splits else headline_split
    job = session.get(Job, model.job_id) if model.job_id else None
    dataset = session.get(Dataset, job.dataset_id) if job and job.dataset_id else None
    return render(
        request,
        "model.html",
        {
            "title": model.name,
            "model": model,
            "evaluation": evaluation,
            "splits": splits,
            "shown": shown,
            "metrics": evaluation.get(shown) or {} if shown else {},
            "job": job,
            "dataset": dataset,
            "config_items": _config_items(model.config or {}),
            "top_k": max(1, min(5, model.num_classes)),
            "exports": export_svc.exports_info(request.app.state.storage, model),
            "serving": export_svc.serving_info(request.app.state.storage, model, _loaded_info(request, model.id)),
            "formats": EXPORT_FORMATS,
            "calibration": evaluation.get("calibration") if isinstance(evaluation.get("calibration"), dict) else None,
            "threshold": model_svc.threshold_info(model),
        },
    )


EXPORT_FORMATS = (("onnx", "ONNX (float32)"), ("torchscript", "TorchScript (float32)"), ("onnx-int8", "ONNX int8"))


def _loaded_info(request: Request, model_id: str) -> dict[str, object] | None:
    entry = request.app.state.model_cache.loaded(model_id)
    return entry.info() if entry is not None else None


@router.get(CHART_JS_URL)
def chart_library(settings: SettingsDep) -> Response:
    """Chart.js's UMD build, straight from node_modules (``make install`` puts it there)."""
    path = settings.assets_dir / CHART_JS
    if not path.is_file():
        message = f"{path} is missing: run `make install` (npm install) to fetch chart.js"
        return JSONResponse(error_body("not_found", message), 404)
    return FileResponse(
        path,
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


def install(app: FastAPI) -> None:
    """Add the pages and the static files (call after the API routes: the pages' paths are all fixed)."""

    @app.exception_handler(LoginRequired)
    async def _to_login(_: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_url, safe='')}", status_code=303)

    app.include_router(login_router)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
