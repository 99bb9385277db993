// New job form: architecture and weights availability, strategy hint, and a JSON POST whose 422
// problems are shown next to the fields they name.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("job-form");
  if (!form) return;
  const errorBox = document.getElementById("job-error");
  const submit = document.getElementById("job-submit");
  const status = document.getElementById("job-status");
  const imagenet = document.getElementById("weights-imagenet");
  const none = document.getElementById("weights-none");
  const missing = document.getElementById("weights-missing");
  const strategy = document.getElementById("strategy");
  const resolved = document.getElementById("strategy-resolved");
  const imageSize = document.getElementById("hp-image_size");

  const selectedArch = () => form.querySelector('input[name="model"]:checked');
  const weights = () => (imagenet.checked ? "imagenet" : "none");

  function updateArch() {
    const arch = selectedArch();
    if (!arch) return;
    const pretrainable = arch.dataset.pretrainable === "1";
    const present = arch.dataset.present === "1";
    imagenet.disabled = !present;
    if (!present && imagenet.checked) none.checked = true;
    if (present && !imagenet.checked && !none.dataset.userChoice) imagenet.checked = true;
    if (!imagenet.checked && !none.checked) none.checked = true;
    if (pretrainable && !present) {
      document.getElementById("weights-arch").textContent = arch.value;
      document.getElementById("weights-file").textContent = arch.dataset.filename;
      document.getElementById("weights-folder").textContent = arch.dataset.folder;
      document.getElementById("weights-command").textContent = arch.dataset.fetch;
      missing.hidden = false;
    } else {
      missing.hidden = true;
    }
    if (imageSize) {
      imageSize.placeholder = `auto (${arch.dataset.imageSize})`;
      imageSize.min = arch.dataset.minImageSize;
    }
    updateStrategy();
  }

  function updateStrategy() {
    let s = strategy.value;
    if (s === "auto") s = weights() === "imagenet" ? "two-stage" : "full";
    const text = {
      "two-stage": "Trains the new head on cached features first, then all layers.",
      full: "Trains all layers from the start.",
      frozen: "Trains only the new head on cached features (fastest).",
    }[s];
    resolved.textContent = strategy.value === "auto" ? `auto → ${s}: ${text}` : text;
    for (const node of form.querySelectorAll('[data-when="two-stage"]')) node.hidden = s !== "two-stage";
  }

  // The settings the job would choose itself for this dataset, architecture and weights: shown in each
  // empty field (placeholder, or the "default" option) with the reason under it. Left empty, the job
  // chooses exactly these and records why; typed over, the user's value wins.
  let defaultsRequest = 0;
  async function updateDefaults() {
    const arch = selectedArch();
    const dataset = form.elements.dataset_id.value;
    if (!arch || !dataset) return;
    const ask = ++defaultsRequest;
    const query = new URLSearchParams({ model: arch.value, weights: weights() });
    let suggested;
    try {
      suggested = await FT.api("GET", `/api/v1/datasets/${encodeURIComponent(dataset)}/defaults?${query}`);
    } catch (e) {
      return; // the form still works with the server's defaults
    }
    if (ask !== defaultsRequest) return; // a newer choice is on its way
    for (const choice of suggested.choices) {
      const input = form.querySelector(`[data-hp="${CSS.escape(choice.setting)}"]`);
      if (!input) continue;
      if (input.tagName === "SELECT" && input.dataset.optional) {
        input.options[0].textContent = `default (${choice.value ? "on" : "off"})`;
      } else if (input.dataset.type === "rate") {
        input.placeholder = `default (${choice.value}), or auto`;
      } else if (input.type !== "checkbox") {
        input.placeholder = `auto (${choice.value})`;
      }
      const field = input.closest(".field");
      let note = field.querySelector(".suggested");
      if (!note) {
        note = FT.el("p", { class: "help suggested" });
        field.insertBefore(note, field.querySelector(".field-error"));
      }
      note.textContent = `Default for this dataset: ${choice.reason}`;
    }
  }

  for (const radio of form.querySelectorAll('input[name="model"]')) {
    radio.addEventListener("change", () => {
      updateArch();
      updateDefaults();
    });
  }
  for (const radio of [imagenet, none]) {
    radio.addEventListener("change", () => {
      none.dataset.userChoice = none.checked ? "1" : "";
      updateStrategy();
      updateDefaults();
    });
  }
  form.elements.dataset_id.addEventListener("change", updateDefaults);
  strategy.addEventListener("change", updateStrategy);
  updateArch();
  updateDefaults();

  function clearErrors() {
    FT.hide(errorBox);
    for (const node of form.querySelectorAll(".field-error")) {
      node.hidden = true;
      node.textContent = "";
    }
    for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  }

  function fieldError(name, message) {
    const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
    if (!slot) return false;
    slot.textContent = slot.textContent ? `${slot.textContent}; ${message}` : message;
    slot.hidden = false;
    const input = form.querySelector(`[data-hp="${CSS.escape(name)}"], [name="${CSS.escape(name)}"]`);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      const advanced = input.closest("details");
      if (advanced) advanced.open = true;
    }
    return true;
  }

  /** 422 details: [{field, message}] from request validation, or the engine's list of sentences. */
  function showProblems(error) {
    const details = Array.isArray(error.details) ? error.details : [];
    for (const d of details) {
      if (d && typeof d === "object" && d.field) {
        fieldError(String(d.field).split(".")[0], d.message);
      } else if (typeof d === "string") {
        const name = d.split(/[\s:]/)[0];
        fieldError(name, d);
      }
    }
    FT.show(errorBox, error.status === 422 ? `Please fix: ${error.message}` : error.message);
    errorBox.scrollIntoView({ block: "nearest" });
  }

  function collect() {
    const body = {
      dataset_id: form.elements.dataset_id.value,
      model: selectedArch() ? selectedArch().value : undefined,
      weights: weights(),
      strategy: strategy.value,
    };
    for (const input of form.querySelectorAll("[data-hp]")) {
      const name = input.dataset.hp;
      const type = input.dataset.type;
      if (input.closest("[hidden]")) continue; // settings that do not apply (head epochs without two-stage)
      if (input.type === "checkbox") {
        body[name] = input.checked;
        continue;
      }
      const raw = input.value.trim();
      if (raw === "") {
        if (input.type === "number" && input.validity.badInput) body[name] = input.value; // let the API say why
        continue; // empty: the server's default
      }
      if (type === "int") body[name] = /^-?\d+$/.test(raw) ? parseInt(raw, 10) : raw;
      else if (type === "float") body[name] = isFinite(Number(raw)) ? Number(raw) : raw;
      else if (type === "rate") body[name] = raw === "auto" || !isFinite(Number(raw)) ? raw : Number(raw);
      else if (type === "bool") body[name] = raw === "true";
      else body[name] = raw;
    }
    return body;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    submit.disabled = true;
    FT.show(status);
    try {
      const job = await FT.api("POST", "/api/v1/jobs", collect());
      window.location.assign(`/jobs/${encodeURIComponent(job.id)}`);
    } catch (e) {
      FT.hide(status);
      submit.disabled = false;
      showProblems(e);
    }
  });
});
