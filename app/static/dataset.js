// A dataset whose upload is being checked: show the check's progress from the API, and the report once
// the check is done (the page is reloaded then; it renders the report or the refusal server-side).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const section = document.getElementById("check-progress");
  if (!section) return;
  const id = section.dataset.dataset;
  const phase = document.getElementById("check-phase");
  const bar = section.querySelector(".progress-bar");
  const meter = section.querySelector(".progress");
  const PHASES = {
    queued: () => "Waiting for a free checker…",
    extracting: (p) => `Extracting the zip: ${p.done} of ${p.total} files`,
    checking: (p) => `Checking every image: ${p.done} of ${p.total}`,
    storing: () => "Storing the dataset…",
  };

  async function poll() {
    let dataset;
    try {
      dataset = await FT.api("GET", `/api/v1/datasets/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e.status === 404) {
        window.location.reload();
        return;
      }
      setTimeout(poll, 3000); // a blip: try again
      return;
    }
    if (dataset.status !== "checking") {
      window.location.reload();
      return;
    }
    const p = dataset.progress || { phase: "queued", done: 0, total: 0 };
    phase.textContent = (PHASES[p.phase] || (() => "Checking…"))(p);
    const pct = p.total ? (100 * p.done) / p.total : 0;
    bar.style.width = `${pct.toFixed(1)}%`;
    meter.setAttribute("aria-valuenow", String(Math.round(pct)));
    setTimeout(poll, 1000);
  }
  setTimeout(poll, 1000);
});
