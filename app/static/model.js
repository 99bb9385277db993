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
      const data = await FT.api("POST", `/api/v1/models/${encodeURIComponent(modelId)}/predict?top_k=${topK}`, body);
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
            url ? FT.el("img", { src: url, alt: file.name }) : FT.el("span"),
            FT.el("div", {}, FT.el("div", { class: "file", text: file ? file.name : `image ${i + 1}` }), labelBars(p.labels || [])),
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
