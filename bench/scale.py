"""``python -m bench.scale [--quick] [--sets digits60k,photos200k]``: the data path at the sizes users bring.

For each generated dataset, with the real service in its own processes (``serve --no-worker`` and a
``worker``):

- upload + verification: the zip is sent as one ``application/zip`` body with ``Prefer: respond-async`` and
  the dataset polled until ``ready``; images/s over the whole (upload, extraction, check, store), and the
  API process's peak RSS (``VmHWM``) against its RSS before the upload.
- bytes on disk per image: the pixel store (shards and catalog) against the uint8 pixels at the stored size,
  the stored originals, and the zip.
- a training job (LeNet, 1 epoch; 224 px crops on the photos so the 256 px copies are read): the job
  process's peak RSS and the most files it had open (sampled from /proc), and its epoch images/s.
- the input pipeline alone on the same folder, in this process: our batches (pinned store -> crops on the
  device) against the PyTorch tutorial's ``ImageFolder`` + ``DataLoader`` (batch 4, 4 workers), images/s.

And once, on 2,000 of the photos: our pipeline's epoch against the per-image cache this store replaced
(the engine at ``BASELINE_REV``, read from git history), both in fresh processes.

Datasets: ``digits60k`` is 60,000 28x28 greyscale PNGs in 10 classes (an MNIST-sized set); ``photos200k`` is
200,000 photo-like JPEGs whose short side is spread log-uniformly over 64-512 px, in four aspect ratios.
They are generated once under ``bench/out/work/scale`` (about 40 GB with everything the run stores).
Results go under ``"scale"`` in ``bench/out/results.json`` and ``bench/RESULTS.md`` is written again.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, admin_key, free_port, machine, ratio, service_env, start_process, stop_process, wait_http

OUT = ROOT / "bench" / "out"
BASELINE_REV = "e71051f"  # the last revision with the per-image pixel cache
SETS = {"digits60k": ("digits", 60_000), "photos200k": ("photos", 200_000)}
QUICK_SIZES = {"digits": 3_000, "photos": 1_500}


def log(msg: str) -> None:
    print(msg, flush=True)


# -- data --------------------------------------------------------------------------------------------------


def _digit(i: int) -> tuple[str, bytes]:
    """A 28x28 greyscale PNG: a stroke figure whose shape is the class, at a random offset, with noise."""
    from PIL import Image, ImageDraw

    rng = random.Random(i)
    label = i % 10
    img = Image.new("L", (28, 28), rng.randint(0, 40))
    draw = ImageDraw.Draw(img)
    cx, cy, r = 14 + rng.randint(-3, 3), 14 + rng.randint(-3, 3), rng.randint(6, 9)
    angle = math.pi * label / 10
    points = [(cx + r * math.cos(angle + k * 2 * math.pi / (label + 3)), cy + r * math.sin(angle + k * 2 * math.pi / (label + 3))) for k in range(label + 3)]  # fmt: skip
    draw.line([*points, points[0]], fill=rng.randint(180, 255), width=2)
    out = io.BytesIO()
    img.save(out, "PNG")
    return f"class{label}/{i:06d}.png", out.getvalue()


ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2)


def _photo(i: int) -> tuple[str, bytes]:
    """A photo-like JPEG: a smooth colour field, a shape (the class) and texture; short side 64-512 px."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(i)
    label = i % 4
    short = int(math.exp(rng.uniform(math.log(64), math.log(512))))
    aspect = ASPECTS[rng.randrange(len(ASPECTS))]
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    field = Image.frombytes("RGB", (3, 3), bytes(rng.randrange(256) for _ in range(27))).resize(
        (w, h), Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(field)
    r = rng.uniform(0.2, 0.35) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    fill = tuple(rng.randrange(256) for _ in range(3))
    if label == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif label == 1:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif label == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=fill, width=max(2, int(r / 4)))
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=fill, width=max(2, int(r / 4)))
    img = Image.blend(field, Image.effect_noise((w, h), 30).convert("RGB"), 0.15).filter(ImageFilter.SMOOTH)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return f"{('circle', 'square', 'triangle', 'cross')[label]}/{i:06d}.jpg", out.getvalue()


def generate(kind: str, n: int, folder: Path) -> Path:
    """``n`` images of ``kind`` in class folders under ``folder`` (made once; two processes)."""
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    make: Callable[[int], tuple[str, bytes]] = _digit if kind == "digits" else _photo
    with Pool(os.cpu_count() or 2) as pool:
        for rel, data in pool.imap_unordered(make, range(n), chunksize=256):
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    (folder / ".complete").write_text(str(n))
    return folder


def zip_folder(folder: Path, path: Path) -> Path:
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:  # PNG and JPEG do not compress further
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                zf.write(f, f.relative_to(folder).as_posix())
    tmp.rename(path)
    return path


# -- watching processes ------------------------------------------------------------------------------------


def _status(pid: int, field: str) -> int:
    """A kB figure from /proc/PID/status (VmRSS, VmHWM), 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _job_pid(job_id: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"app.jobs.child" in argv and job_id.encode() in argv:
                return int(entry.name)
    return None


class Sampler:
    """Samples a process's RSS and open files every ``interval`` seconds, in a thread."""

    def __init__(self, pid: Callable[[], int | None], interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_hwm_kb = 0
        # RssAnon: the process's own memory; VmRSS/VmHWM also count the pixel store's mapped pages, which the
        # kernel drops under pressure like any page cache.
        self.peak_anon_kb = 0
        self.max_files = 0
        self.file_counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            pid = self.pid()
            if pid is None:
                continue
            self.peak_rss_kb = max(self.peak_rss_kb, _status(pid, "VmRSS"))
            self.peak_hwm_kb = max(self.peak_hwm_kb, _status(pid, "VmHWM"))
            self.peak_anon_kb = max(self.peak_anon_kb, _status(pid, "RssAnon"))
            files = _open_files(pid)
            if files:
                self.file_counts.append(files)
                self.max_files = max(self.max_files, files)


# -- the service arm ---------------------------------------------------------------------------------------


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def service_run(name: str, kind: str, n: int, folder: Path, archive: Path, work: Path) -> dict[str, Any]:
    data = work / f"service-{name}"
    shutil.rmtree(data, ignore_errors=True)
    env = service_env(data)
    env.update(
        {
            "FINETUNE_MAX_UPLOAD_BYTES": str(64 * 1024**3),
            "FINETUNE_MAX_EXTRACTED_BYTES": str(256 * 1024**3),
            "FINETUNE_MAX_ARCHIVE_ENTRIES": str(2_000_000),
            "FINETUNE_RATE_LIMIT_UPLOADS_PER_HOUR": "0",
            "FINETUNE_CACHE_MAX_BYTES": str(200 * 1024**3),
        }
    )
    auth = {"Authorization": f"Bearer {admin_key(env)}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api = start_process(
        ["-m", "app.cli", "serve", "--no-worker", "--port", str(port)], env, work / "logs" / f"{name}-serve.log"
    )
    worker = None
    result: dict[str, Any] = {"images": n, "zip_bytes": archive.stat().st_size}
    try:
        wait_http(f"{base}/healthz")
        rss_before = _status(api.pid, "VmRSS")
        log(f"  {name}: uploading {archive.stat().st_size / 1e9:.2f} GB ({n} images)")
        with Sampler(lambda: api.pid) as api_watch:
            t0 = time.perf_counter()
            with open(archive, "rb") as body:
                r = httpx.post(
                    f"{base}/api/v1/datasets",
                    params={"name": name},
                    content=body,
                    headers={**auth, "Content-Type": "application/zip", "Prefer": "respond-async"},
                    timeout=3600,
                )
            r.raise_for_status()
            uploaded = time.perf_counter() - t0
            dataset_id = r.json()["id"]
            while True:
                d = httpx.get(f"{base}/api/v1/datasets/{dataset_id}", headers=auth, timeout=60).json()
                if d["status"] != "checking":
                    break
                time.sleep(0.5)
            total = time.perf_counter() - t0
        if d["status"] != "ready":
            raise RuntimeError(f"{name} was refused: {d['error']}")
        ready = httpx.get(f"{base}/readyz", timeout=30).json()
        store = ready["pixel_store"]
        catalog = sum(f.stat().st_size for f in (data / "cache" / "pixelstore").glob("catalog.sqlite*"))
        originals = _folder_bytes(data / "datasets" / dataset_id / "images")
        result.update(
            {
                "upload_seconds": uploaded,
                "ingest_seconds": total,
                "ingest_images_per_sec": n / total,
                "api_rss_before_mb": rss_before / 1024,
                "api_peak_rss_mb": max(api_watch.peak_hwm_kb, _status(api.pid, "VmHWM")) / 1024,
                "api_peak_anon_mb": api_watch.peak_anon_kb / 1024,
                "usable_images": d["num_images"],
                "store_bytes": store["used_bytes"] + catalog,
                "store_entries": store["entries"],
                "store_shards": store["shards"],
                "originals_bytes": originals,
                "pixel_bytes": _stored_pixel_bytes(data / "cache"),
            }
        )
        for key in ("store_bytes", "originals_bytes", "zip_bytes", "pixel_bytes"):
            result[key.replace("_bytes", "_bytes_per_image")] = result[key] / n
        result["store_over_pixels"] = result["store_bytes"] / result["pixel_bytes"]
        log(
            f"  {name}: ready in {total:.0f} s ({n / total:.0f} img/s), store {result['store_bytes_per_image']:.0f} "
            f"B/image ({result['store_over_pixels']:.3f}x the pixels), API peak RSS {result['api_peak_rss_mb']:.0f} MB"
        )
        # -- a training job reading the stored pixels
        worker = start_process(["-m", "app.cli", "worker"], env, work / "logs" / f"{name}-worker.log")
        # LeNet: a job whose model costs little, so the epoch shows the data path. On the photos it trains at
        # 64 px, which reads (and first stores) the 64 px copies: a job at another size than the upload's.
        crop = 32 if kind == "digits" else 64
        job = httpx.post(
            f"{base}/api/v1/jobs",
            json={"dataset_id": dataset_id, "model": "lenet", "weights": "none", "epochs": 1, "image_size": crop,
                  "batch_size": 64},
            headers=auth,
            timeout=60,
        ).json()  # fmt: skip
        job_pid: dict[str, int | None] = {"pid": None}

        def current() -> int | None:
            if job_pid["pid"] is None or not Path(f"/proc/{job_pid['pid']}").exists():
                job_pid["pid"] = _job_pid(job["id"])
            return job_pid["pid"]

        with Sampler(current) as job_watch:
            t0 = time.perf_counter()
            while True:
                j = httpx.get(f"{base}/api/v1/jobs/{job['id']}", headers=auth, timeout=60).json()
                if j["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.5)
        if j["status"] != "succeeded":
            raise RuntimeError(f"the {name} job ended {j['status']}: {j.get('error')}")
        history = j.get("metrics") or j.get("history") or []
        epoch = history[-1] if history else {}
        result["job"] = {
            "crop": crop,
            "seconds": time.perf_counter() - t0,
            "epoch_images_per_sec": epoch.get("images_per_sec"),
            "val_acc": epoch.get("val_acc"),
            "peak_rss_mb": job_watch.peak_hwm_kb / 1024,
            "peak_anon_mb": job_watch.peak_anon_kb / 1024,
            "max_open_files": job_watch.max_files,
            "median_open_files": sorted(job_watch.file_counts)[len(job_watch.file_counts) // 2]
            if job_watch.file_counts
            else None,
        }
        log(f"  {name}: job {result['job']}")
        result["data_dir"] = str(data)
        result["dataset_id"] = dataset_id
        return result
    finally:
        if worker is not None:
            stop_process(worker)
        stop_process(api)


def _stored_pixel_bytes(cache: Path) -> int:
    """The uint8 pixels of every stored image at its stored size (the store's own index, summed)."""
    import sqlite3

    with sqlite3.connect(cache / "pixelstore" / "catalog.sqlite") as db:
        return int(db.execute("SELECT COALESCE(SUM(height * width * 3), 0) FROM entries").fetchone()[0])


# -- the input pipeline, against the tutorial's DataLoader -------------------------------------------------


def pipeline_run(folder: Path, cache: Path, crop: int, limit: int) -> dict[str, Any]:
    """Images/s of training batches: ours from the (already filled) store, the tutorial's from the files."""
    import torch

    from bench.reference import tutorial_transforms
    from finetune.datastore import load_into_store
    from finetune.loader import TrainAugment, batches
    from finetune.models import preprocessing_for

    prep = preprocessing_for("resnet18", "none", crop)
    with load_into_store(folder, cache_root=cache, tier=prep.tier) as stored:
        images = stored.splits["train"]
        augment = TrainAugment(prep, torch.device("cpu"), channels_last=True)
        gen = torch.Generator().manual_seed(0)
        order = batches(len(images), 64, generator=gen)[: max(1, limit // 64)]
        t0 = time.perf_counter()
        seen = sum(int(x.shape[0]) for x, _ in augment.batches(images, order, gen))
        ours = seen / (time.perf_counter() - t0)

    from torchvision import datasets

    ds = datasets.ImageFolder(str(folder), tutorial_transforms(crop)["train"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=4)
    t0 = time.perf_counter()
    seen = 0
    for x, _ in loader:
        seen += int(x.shape[0])
        if seen >= limit // 4:  # the tutorial is slower: a quarter as many images gives the same timing error
            break
    tutorial = seen / (time.perf_counter() - t0)
    return {
        "crop": crop,
        "ours_images_per_sec": ours,
        "tutorial_images_per_sec": tutorial,
        "ratio": ratio(ours, tutorial),
    }


# -- before and after, at 2,000 images ---------------------------------------------------------------------

OLD_EPOCH = """
import sys, time, torch
from pathlib import Path
from finetune.dataset import load_dataset
from finetune.loader import CachedImages, TrainAugment, batches
from finetune.models import preprocessing_for
from finetune.pixelcache import PixelCache
folder, cache = Path(sys.argv[1]), Path(sys.argv[2])
prep = preprocessing_for("resnet18", "none", 224)
pixels = PixelCache(cache / "pixels", prep.resize_size)
ds = load_dataset(folder, pixel_cache=pixels)
images = CachedImages(pixels, ds.split("train"))
EPOCH
"""
NEW_EPOCH = """
import sys, time, torch
from pathlib import Path
from finetune.datastore import load_into_store
from finetune.loader import TrainAugment, batches
from finetune.models import preprocessing_for
folder, cache = Path(sys.argv[1]), Path(sys.argv[2])
prep = preprocessing_for("resnet18", "none", 224)
stored = load_into_store(folder, cache_root=cache, tier=prep.tier)
images = stored.splits["train"]
EPOCH
"""
EPOCH = """
augment = TrainAugment(prep, torch.device("cpu"), channels_last=True)
rates = []
for seed in range(3):  # the first epoch reads from disk, the others from the page cache
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    n = sum(int(x.shape[0]) for x, _ in augment.batches(images, batches(len(images), 64, generator=gen), gen))
    rates.append(n / (time.perf_counter() - t0))
print(max(rates[1:]))
"""


def baseline_run(photos: Path, work: Path, n: int) -> dict[str, Any]:
    """Our pipeline's epoch against the per-image cache at ``BASELINE_REV``, on the first ``n`` photos."""
    subset = work / f"photos-{n}"
    if not (subset / ".complete").exists():
        shutil.rmtree(subset, ignore_errors=True)
        classes = sorted(p for p in photos.iterdir() if p.is_dir())
        for folder in classes:  # the same number from each class
            (subset / folder.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.glob("*.jpg"))[: n // len(classes)]:
                shutil.copy(f, subset / folder.name / f.name)
        (subset / ".complete").write_text(str(n))
    old_src = work / f"engine-{BASELINE_REV}"
    if not (old_src / "finetune").exists():
        archive = subprocess.run(
            ["git", "archive", BASELINE_REV, "finetune"], cwd=ROOT, capture_output=True, check=True
        )
        old_src.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(old_src, filter="data")
    rates: dict[str, list[float]] = {"before": [], "after": []}
    for repeat in range(2):
        for arm in ("before", "after") if repeat % 2 == 0 else ("after", "before"):
            cache = work / f"cache-{arm}"
            script = (OLD_EPOCH if arm == "before" else NEW_EPOCH).replace("EPOCH", EPOCH)
            env = {**os.environ, "PYTHONPATH": str(old_src if arm == "before" else ROOT)}
            out = subprocess.run(  # cwd first on sys.path: run each arm from its own source folder
                [sys.executable, "-c", script, str(subset), str(cache)],
                env=env,
                cwd=old_src if arm == "before" else ROOT,
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise RuntimeError(f"the {arm} arm failed: {out.stderr[-2000:]}")
            rates[arm].append(float(out.stdout.strip().splitlines()[-1]))
    before, after = max(rates["before"]), max(rates["after"])
    return {
        "images": n,
        "revision": BASELINE_REV,
        "before_images_per_sec": before,
        "after_images_per_sec": after,
        "ratio": ratio(after, before),
    }


# -- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="3,000 digits and 1,500 photos: checks the harness")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    work = args.out / "work" / ("scale-quick" if args.quick else "scale")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"sets": {}}
    photos_folder: Path | None = None
    for name in args.sets.split(","):
        kind, n = SETS[name]
        n = QUICK_SIZES[kind] if args.quick else n
        set_started = time.perf_counter()
        log(f"{name}: generating {n} {kind}")
        folder = generate(kind, n, work / f"{name}-files")
        archive = zip_folder(folder, work / f"{name}.zip")
        run = service_run(name, kind, n, folder, archive, work)
        crop = 32 if kind == "digits" else 224
        log(f"  {name}: input pipeline against the tutorial's DataLoader")
        run["pipeline"] = pipeline_run(
            folder, Path(run["data_dir"]) / "cache", crop, 20_000 if not args.quick else 2_000
        )
        log(f"  {name}: {run['pipeline']}")
        shutil.rmtree(run.pop("data_dir"), ignore_errors=True)  # tens of GB: the next set needs the room
        run["seconds"] = time.perf_counter() - set_started
        result["sets"][name] = run
        if kind == "photos":
            photos_folder = folder
    if photos_folder is not None:
        n = 300 if args.quick else 2_000
        log(f"before/after at {n} photos")
        result["baseline"] = baseline_run(photos_folder, work, n)
        log(f"  {result['baseline']}")
    result["seconds"] = time.perf_counter() - started
    result["quick"] = args.quick
    save(result, args.out, args.quick)
    return 0


def save(result: dict[str, Any], out: Path, quick: bool) -> None:
    """Merge into the results JSON (sets measured in earlier runs stay) and write the report's Scale section
    in place (a quick run writes a report of its own)."""
    from bench.report import replace_section, scale_lines, write_markdown

    results_path = out / ("results.quick.json" if quick else "results.json")
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("machine", machine())
    results.setdefault("data", "bench.scale: generated digits and photos")
    results.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    earlier = results.get("scale", {})
    if earlier.get("quick") == quick:
        result = {**earlier, **result, "sets": {**earlier.get("sets", {}), **result["sets"]}}
    results["scale"] = result
    results_path.write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {results_path}")
    if quick:
        md = write_markdown(results, out / "RESULTS.quick.md")
    else:
        md = ROOT / "bench" / "RESULTS.md"
        md.write_text(replace_section(md.read_text(), scale_lines(result)))
    log(f"wrote {md}")


if __name__ == "__main__":
    sys.exit(main())
