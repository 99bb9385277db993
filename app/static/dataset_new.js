// Dataset upload: a zip (field `archive`) or a folder picker (`files` + `paths`, each file's
// webkitRelativePath, in the same order), posted with its upload progress shown; the dataset's page then
// shows the check's progress. Errors show the API's message.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload-form");
  const nameInput = document.getElementById("name");
  const folderInput = document.getElementById("folder");
  const zipInput = document.getElementById("archive");
  const folderSummary = document.getElementById("folder-summary");
  const zipSummary = document.getElementById("zip-summary");
  const preview = document.getElementById("class-preview");
  const errorBox = document.getElementById("upload-error");
  const status = document.getElementById("upload-status");
  const statusText = document.getElementById("upload-status-text");
  const submit = document.getElementById("upload-submit");
  const maxBytes = Number(form.dataset.maxBytes);
  const maxFiles = Number(form.dataset.maxFiles);
  const SPLITS = new Set(["train", "training", "val", "valid", "validation", "test", "testing"]);
  let mode = null; // "folder" | "zip"

  // Hidden files (.DS_Store, ._x) and macOS metadata folders below the picked folder are not images.
  const isHidden = (path) =>
    path
      .split("/")
      .slice(1)
      .some((part) => part.startsWith(".") || part === "__MACOSX" || part === "Thumbs.db");

  function folderFiles() {
    return Array.from(folderInput.files).filter((f) => !isHidden(f.webkitRelativePath || f.name));
  }

  /** Class folders as the engine will see them: below the picked folder (and below split folders). */
  function classCounts(files) {
    const counts = new Map();
    const rels = files.map((f) => (f.webkitRelativePath || f.name).split("/").slice(1));
    const top = new Set(rels.filter((p) => p.length > 1).map((p) => p[0].toLowerCase()));
    const splitLayout = top.size > 0 && [...top].every((t) => SPLITS.has(t));
    for (const parts of rels) {
      const cls = splitLayout ? parts.length > 2 && parts[1] : parts.length > 1 && parts[0];
      if (cls) counts.set(cls, (counts.get(cls) || 0) + 1);
    }
    return counts;
  }

  function showPreview(counts) {
    preview.replaceChildren();
    if (!counts || counts.size === 0) {
      preview.hidden = true;
      return;
    }
    for (const [cls, n] of [...counts.entries()].sort()) {
      preview.append(FT.el("li", {}, FT.el("strong", { text: cls }), ` ${n}`));
    }
    preview.hidden = false;
  }

  function select(which) {
    mode = which;
    document.getElementById("folder-choice").classList.toggle("selected", which === "folder");
    document.getElementById("zip-choice").classList.toggle("selected", which === "zip");
    FT.hide(errorBox);
  }

  folderInput.addEventListener("change", () => {
    const files = folderFiles();
    if (!folderInput.files.length) return;
    zipInput.value = "";
    zipSummary.textContent = "No file chosen.";
    select("folder");
    const root = (folderInput.files[0].webkitRelativePath || "").split("/")[0];
    const size = files.reduce((sum, f) => sum + f.size, 0);
    const counts = classCounts(files);
    folderSummary.textContent = `${root || "folder"}: ${files.length} files, ${FT.bytes(size)}, ${counts.size} class folders`;
    nameInput.placeholder = root || nameInput.placeholder;
    showPreview(counts);
  });

  zipInput.addEventListener("change", () => {
    const file = zipInput.files[0];
    if (!file) return;
    folderInput.value = "";
    folderSummary.textContent = "No folder chosen.";
    showPreview(null);
    select("zip");
    zipSummary.textContent = `${file.name}: ${FT.bytes(file.size)}`;
    nameInput.placeholder = file.name.replace(/\.zip$/i, "");
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    FT.hide(errorBox);
    const body = new FormData();
    const name = nameInput.value.trim() || (mode ? nameInput.placeholder : "");
    if (name) body.append("name", name);
    let count = 0;
    let size = 0;
    if (mode === "zip" && zipInput.files[0]) {
      body.append("archive", zipInput.files[0], zipInput.files[0].name);
      count = 1;
      size = zipInput.files[0].size;
    } else if (mode === "folder") {
      for (const file of folderFiles()) {
        const path = file.webkitRelativePath || file.name;
        body.append("files", file, file.name);
        body.append("paths", path);
        count++;
        size += file.size;
      }
    }
    if (count === 0) {
      FT.show(errorBox, "Choose a folder of class folders or a .zip file first.");
      return;
    }
    if (size > maxBytes) {
      FT.show(errorBox, `The upload is ${FT.bytes(size)}, more than this server's limit of ${FT.bytes(maxBytes)}.`);
      return;
    }
    if (count > maxFiles) {
      FT.show(errorBox, `The folder has ${count} files, more than this server's limit of ${maxFiles}.`);
      return;
    }
    submit.disabled = true;
    const what = mode === "zip" ? FT.bytes(size) : `${count} files (${FT.bytes(size)})`;
    statusText.textContent = `Uploading ${what}…`;
    FT.show(status);
    try {
      // 202 as soon as the body has arrived: the dataset's page then follows the check of every image.
      const dataset = await upload(body, (sent, total) => {
        const pct = total ? Math.floor((100 * sent) / total) : 0;
        statusText.textContent =
          sent < total ? `Uploading ${what}: ${pct}%` : "Uploaded. Starting the check of every image…";
      });
      window.location.assign(`/datasets/${encodeURIComponent(dataset.id)}`);
    } catch (e) {
      FT.hide(status);
      FT.show(errorBox, e.message);
      submit.disabled = false;
    }
  });

  /** POST the form with XMLHttpRequest (fetch cannot report upload progress); the API's error shape on failure. */
  function upload(body, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/api/v1/datasets");
      xhr.setRequestHeader("Accept", "application/json");
      xhr.setRequestHeader("Prefer", "respond-async");
      xhr.setRequestHeader("X-CSRF-Token", FT.csrfToken());
      xhr.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : 0));
      xhr.addEventListener("load", () => {
        let data = null;
        try {
          data = xhr.responseText ? JSON.parse(xhr.responseText) : null;
        } catch (e) {
          data = { error: { message: xhr.responseText.slice(0, 300) } };
        }
        if (xhr.status >= 200 && xhr.status < 300) resolve(data);
        else reject(new Error((data && data.error && data.error.message) || `upload failed (HTTP ${xhr.status})`));
      });
      xhr.addEventListener("error", () => reject(new Error("the server could not be reached")));
      xhr.send(body);
    });
  }
});
