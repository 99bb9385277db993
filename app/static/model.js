// Model page: drop (or pick) images, POST them to the predict endpoint, show the top-k labels as bars.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("predict-form");
  const input = document.getElementById("predict-input");
  const zone = document.getElementById("dropzone");
  const results = document.getElementById("predictions");
  const errorBox = document.getElementById("predict-error");
  const status = document.getElementById("predict-status");
  const modelId = form.dataset.modelId;
  const topK = Number(form.dataset.topK) || 5;
  const previews = [];

  function labelBars(labels) {
    const list = FT.el("ul", { class: "label-bars" });
    for (const l of labels) {
      const p = Math.max(0, Math.min(1, Number(l.probability) || 0));
      list.append(
        FT.el(
          "li",
          { class: "label-bar", title: `${l.label}: ${FT.pct(p, 2)}` },
          FT.el("span", { class: "name", text: l.label }),
          FT.el("span", { class: "track" }, FT.el("span", { class: "fill", style: { width: `${(p * 100).toFixed(1)}%`, display: "block" } })),
          FT.el("span", { class: "prob", text: FT.pct(p) }),
        ),
      );
    }
    return list;
  }

  // The image, with its Grad-CAM heat map (a greyscale PNG of the image's size) drawn over it in colour:
  // transparent where the model found nothing, red where it found the most.
  function preview(url, name, cam) {
    const img = FT.el("img", { src: url, alt: name });
    if (!cam) return img;
    const canvas = FT.el("canvas", { class: "gradcam", width: cam.width, height: cam.height, title: `Grad-CAM for ${cam.label}` });
    const heat = new Image();
    heat.onload = () => {
      const ctx = canvas.getContext("2d");
      ctx.drawImage(heat, 0, 0);
      const pixels = ctx.getImageData(0, 0, cam.width, cam.height);
      const d = pixels.data;
      for (let i = 0; i < d.length; i += 4) {
        const v = d[i] / 255;
        d[i] = 255;
        d[i + 1] = Math.round(220 * (1 - v));
        d[i + 2] = 0;
        d[i + 3] = Math.round(170 * v);
      }
      ctx.putImageData(pixels, 0, 0);
    };
    heat.src = `data:image/png;base64,${cam.png}`;
    return FT.el("span", { class: "gradcam-wrap" }, img, canvas);
  }

  async function predict(files) {
    files = files.filter((f) => f.type.startsWith("image/") || /\.(jpe?g|png|gif|bmp|webp|tiff?)$/i.test(f.name));
    if (!files.length) {
      FT.show(errorBox, "Choose one or more image files.");
      return;
    }
    FT.hide(errorBox);
    FT.show(status);
    const body = new FormData();
    for (const f of files) body.append("images", f, f.name);
    try {
      const explain = document.getElementById("explain-input");
      const query = `top_k=${topK}${explain && explain.checked ? "&explain=gradcam" : ""}`;
      const data = await FT.api("POST", `/api/v1/models/${encodeURIComponent(modelId)}/predict?${query}`, body);
      for (const url of previews.splice(0)) URL.revokeObjectURL(url);
      results.replaceChildren();
      (data.predictions || []).forEach((p, i) => {
        const file = files[i];
        const url = file ? URL.createObjectURL(file) : null;
        if (url) previews.push(url);
        results.append(
          FT.el(
            "div",
            { class: "prediction" },
            url ? preview(url, file.name, p.gradcam) : FT.el("span"),
            FT.el(
              "div",
              {},
              FT.el("div", { class: "file", text: file ? file.name : `image ${i + 1}` }),
              FT.el("div", { class: p.label === "unknown" ? "answer unknown" : "answer", text: p.label === "unknown" ? "unknown (below the threshold)" : p.label }),
              labelBars(p.labels || []),
            ),
          ),
        );
      });
    } catch (e) {
      FT.show(errorBox, e.message);
    } finally {
      FT.hide(status);
      input.value = "";
    }
  }

  input.addEventListener("change", () => predict(Array.from(input.files)));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("dragover");
    });
  }
  for (const type of ["dragleave", "dragend"]) zone.addEventListener(type, () => zone.classList.remove("dragover"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragover");
    predict(Array.from(e.dataTransfer.files));
  });
  // Pasting an image (e.g. a screenshot) predicts it too.
  document.addEventListener("paste", (e) => {
    const files = Array.from(e.clipboardData ? e.clipboardData.files : []);
    if (files.length) predict(files);
  });
});

// Export and serving: make an export (with its parity check), or switch the serving precision.
document.addEventListener("DOMContentLoaded", () => {
  const section = document.getElementById("exports");
  if (!section) return;
  const modelId = section.dataset.modelId;
  const errorBox = document.getElementById("export-error");
  const status = document.getElementById("export-status");
  section.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-export], button[data-precision]");
    if (!button) return;
    FT.hide(errorBox);
    button.disabled = true;
    try {
      if (button.dataset.export) {
        FT.show(status);
        await FT.api("POST", `/api/v1/models/${modelId}/exports?format=${encodeURIComponent(button.dataset.export)}`);
      } else {
        await FT.api("PUT", `/api/v1/models/${modelId}/serving`, { precision: button.dataset.precision });
      }
      window.location.reload();
    } catch (e) {
      FT.show(errorBox, e.message);
      button.disabled = false;
    } finally {
      FT.hide(status);
    }
  });
});

// Calibration: the reliability diagram, the coverage/accuracy trade-off, and the "unknown" threshold.
document.addEventListener("DOMContentLoaded", () => {
  const section = document.getElementById("calibration");
  if (!section) return;
  const modelId = section.dataset.modelId;
  const data = JSON.parse(document.getElementById("calibration-data").textContent || "{}");
  const form = document.getElementById("threshold-form");
  const input = document.getElementById("threshold-input");
  const errorBox = document.getElementById("threshold-error");

  async function save(threshold) {
    FT.hide(errorBox);
    try {
      await FT.api("PATCH", `/api/v1/models/${encodeURIComponent(modelId)}`, { threshold });
      window.location.reload();
    } catch (e) {
      FT.show(errorBox, e.message);
    }
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (value === "" || Number.isNaN(Number(value))) {
      FT.show(errorBox, "Give a threshold between 0 and 1 (0: never answer unknown).");
      return;
    }
    save(Number(value));
  });
  const reset = document.getElementById("threshold-reset");
  if (reset) reset.addEventListener("click", () => save(null));

  if (typeof Chart === "undefined") return; // the library is missing: the figures above still show
  const split = data.test || data.val;
  if (split) {
    const bins = (split.reliability_after || []).map((b, i) => ({ ...b, before: (split.reliability_before || [])[i] }));
    const centres = bins.map((b) => (b.lower + b.upper) / 2);
    const point = (b) => (b && b.count ? b.accuracy : null);
    window.calibrationCharts = window.calibrationCharts || {};
    window.calibrationCharts.reliability = new Chart(document.getElementById("reliability-chart"), {
      type: "bar",
      data: {
        labels: centres.map((c) => `${Math.round(c * 100)}%`),
        datasets: [
          { label: "before", data: bins.map((b) => point(b.before)), backgroundColor: "rgba(249,115,22,0.55)" },
          { label: "after", data: bins.map(point), backgroundColor: "rgba(37,99,235,0.7)" },
          { type: "line", label: "perfect", data: centres, borderColor: "#64748b", borderDash: [4, 4], pointRadius: 0, fill: false },
        ],
      },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        plugins: {
          legend: { position: "bottom" },
          tooltip: {
            callbacks: {
              label: (item) => {
                if (item.dataset.label === "perfect") return "";
                const b = item.dataset.label === "before" ? bins[item.dataIndex].before : bins[item.dataIndex];
                return `${item.dataset.label}: accuracy ${FT.pct(b.accuracy)}, confidence ${FT.pct(b.confidence)}, ${b.count} images`;
              },
            },
          },
        },
        scales: {
          x: { title: { display: true, text: "confidence" } },
          y: { min: 0, max: 1, title: { display: true, text: "accuracy" }, ticks: { callback: (v) => `${Math.round(v * 100)}%` } },
        },
      },
    });
  }
  const coverage = data.coverage || [];
  if (coverage.length) {
    window.calibrationCharts = window.calibrationCharts || {};
    window.calibrationCharts.coverage = new Chart(document.getElementById("coverage-chart"), {
      type: "line",
      data: {
        labels: coverage.map((p) => p.threshold.toFixed(2)),
        datasets: [
          { label: "coverage (answered)", data: coverage.map((p) => p.coverage), borderColor: "#2563eb", backgroundColor: "#2563eb", pointRadius: 2 },
          { label: "accuracy of answers", data: coverage.map((p) => p.accuracy), borderColor: "#16a34a", backgroundColor: "#16a34a", pointRadius: 2 },
        ],
      },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: { position: "bottom" },
          tooltip: { callbacks: { title: (items) => (items.length ? `threshold ${items[0].label}` : ""), label: (item) => `${item.dataset.label}: ${FT.pct(item.parsed.y)}` } },
        },
        scales: {
          x: { title: { display: true, text: "threshold" } },
          y: { min: 0, max: 1, ticks: { callback: (v) => `${Math.round(v * 100)}%` } },
        },
      },
    });
  }
});

// The misclassified gallery: test images the model got wrong, grouped by confusion (true -> predicted, the most
// frequent first); a click on a confusion-matrix cell shows that cell's images.
document.addEventListener("DOMContentLoaded", () => {
  const section = document.getElementById("misclassified");
  if (!section) return;
  const modelId = encodeURIComponent(section.dataset.modelId);
  const gallery = document.getElementById("gallery");
  const summary = document.getElementById("gallery-summary");
  const allButton = document.getElementById("gallery-all");

  function render(data, cell) {
    gallery.replaceChildren();
    if (!data.available) {
      summary.textContent = "This model was trained before its misclassified images were recorded.";
      return;
    }
    if (!data.total) {
      summary.textContent = `The model got every one of the ${data.images} test images right.`;
      return;
    }
    const shown = data.recorded < data.total ? ` (the first ${data.recorded} are listed)` : "";
    summary.textContent = cell
      ? `${cell} — click another cell of the confusion matrix, or see all confusions.`
      : `${data.total} of ${data.images} test images are misclassified${shown}. Click a cell of the confusion matrix to see its images.`;
    for (const group of data.confusions) {
      const thumbs = FT.el("div", { class: "gallery-thumbs" });
      for (const item of group.items) {
        thumbs.append(
          FT.el(
            "figure",
            { class: "gallery-item", title: item.path },
            FT.el("img", { src: item.thumbnail_url, alt: item.path, loading: "lazy" }),
            FT.el("figcaption", { class: "small", text: `${group.predicted} ${FT.pct(item.probability)}` }),
          ),
        );
      }
      const more = group.count > group.items.length ? ` (${group.items.length} shown)` : "";
      gallery.append(
        FT.el(
          "div",
          { class: "gallery-group", "data-true": group.true_index, "data-predicted": group.predicted_index },
          FT.el("h3", { text: `${group.true} → ${group.predicted} · ${group.count} image${group.count === 1 ? "" : "s"}${more}` }),
          thumbs,
        ),
      );
    }
  }

  async function load(trueIndex, predictedIndex) {
    const cell = trueIndex !== undefined;
    const query = cell ? `?true=${trueIndex}&predicted=${predictedIndex}&limit=500` : "?limit=12";
    try {
      const data = await FT.api("GET", `/api/v1/models/${modelId}/misclassified${query}`);
      const group = data.confusions[0];
      render(data, cell && group ? `${group.true} → ${group.predicted}: ${group.count} image${group.count === 1 ? "" : "s"}` : null);
      allButton.hidden = !cell;
    } catch (e) {
      summary.textContent = e.message;
    }
  }

  document.addEventListener("click", (event) => {
    const td = event.target.closest("td.cell-link");
    if (!td) return;
    load(td.dataset.true, td.dataset.predicted);
    section.scrollIntoView({ behavior: "smooth", block: "start" });
  });
  document.addEventListener("keydown", (event) => {
    const td = event.target.closest && event.target.closest("td.cell-link");
    if (td && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      td.click();
    }
  });
  allButton.addEventListener("click", () => load());
  load();
});
