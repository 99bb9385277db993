// Home: while any job is queued or running, poll the jobs list and refresh their progress; when one
// finishes, reload (a succeeded job adds a model to the list).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const ACTIVE = new Set(["queued", "running"]);
  const rows = () => [...document.querySelectorAll("tr[data-job-id]")];
  if (!rows().some((r) => ACTIVE.has(r.dataset.status))) return;

  async function poll() {
    let jobs;
    try {
      jobs = await FT.api("GET", "/api/v1/jobs");
    } catch (e) {
      return setTimeout(poll, 10000); // the server restarting: try again later
    }
    const byId = new Map(jobs.map((j) => [j.id, j]));
    for (const row of rows()) {
      const job = byId.get(row.dataset.jobId);
      if (!job) continue;
      if (job.status !== row.dataset.status) {
        window.location.reload();
        return;
      }
      const bar = row.querySelector(".progress-bar");
      if (bar) bar.style.width = `${(Math.max(0, Math.min(1, job.progress)) * 100).toFixed(1)}%`;
      const note = row.querySelector(".progress-cell .small");
      if (note && job.status === "running") {
        note.textContent = `epoch ${job.epoch}/${job.total_epochs}` + (job.eta_seconds ? ` · ETA ${FT.duration(job.eta_seconds)}` : "");
      }
    }
    setTimeout(poll, 3000);
  }
  setTimeout(poll, 3000);
});
