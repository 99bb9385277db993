// Live job page: progress, ETA and stage from the job's Server-Sent Events, loss and accuracy charts
// (chart.js, served from node_modules) that gain a point per epoch, cancel and resume. A "reset" event
// (each connection's first, and whenever a resumed attempt rewrote the history) replaces every epoch shown.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const initial = JSON.parse(document.getElementById("job-data").textContent);
  const jobId = initial.id;
  const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
  const STATUS_LABELS = { queued: "Queued", running: "Running", succeeded: "Succeeded", failed: "Failed", cancelled: "Cancelled" };
  const $ = (id) => document.getElementById(id);
  const metrics = new Map(); // epoch -> metric: exactly the job's current history
  let source = null;
  let current = initial;

  // -- charts ---------------------------------------------------------------------------------------
  const COLORS = { train: "#2563eb", val: "#f97316" };
  function lineChart(canvas, yTitle, percent) {
    if (typeof Chart === "undefined") return null; // the library is missing: the table still updates
    return new Chart(canvas, {
      type: "line",
      data: {
        labels: [],
        datasets: [
          { label: "train", data: [], borderColor: COLORS.train, backgroundColor: COLORS.train, tension: 0.25, pointRadius: 3 },
          { label: "validation", data: [], borderColor: COLORS.val, backgroundColor: COLORS.val, tension: 0.25, pointRadius: 3 },
        ],
      },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: { position: "bottom" },
          tooltip: {
            callbacks: {
              title: (items) => (items.length ? `epoch ${items[0].label}` : ""),
              label: (item) => `${item.dataset.label}: ${percent ? FT.pct(item.parsed.y) : FT.num(item.parsed.y)}`,
            },
          },
        },
        scales: {
          x: { title: { display: true, text: "epoch" } },
          y: {
            title: { display: true, text: yTitle },
            ...(percent ? { min: 0, max: 1, ticks: { callback: (v) => `${Math.round(v * 100)}%` } } : { beginAtZero: true }),
          },
        },
      },
    });
  }
  const lossChart = lineChart($("loss-chart"), "loss", false);
  const accChart = lineChart($("acc-chart"), "accuracy", true);

  function redrawCharts(sorted) {
    const labels = sorted.map((m) => m.epoch);
    for (const [chart, train, val] of [
      [lossChart, "train_loss", "val_loss"],
      [accChart, "train_acc", "val_acc"],
    ]) {
      if (!chart) continue;
      chart.data.labels = labels;
      chart.data.datasets[0].data = sorted.map((m) => m[train]);
      chart.data.datasets[1].data = sorted.map((m) => m[val]);
      chart.update("none");
    }
  }

  // -- what the run chose itself: defaults with reasons, the budget's plan, the range test's curve ----
  let lrChart = null;
  function renderChoices(choices) {
    const section = $("run-choices");
    if (!section || !choices) return;
    section.hidden = false;
    const defaults = choices.defaults || [];
    $("choice-list").replaceChildren(
      ...defaults.map((c) => FT.el("li", { "data-setting": c.setting, text: c.reason })),
    );
    const budget = choices.budget;
    $("budget-plan").hidden = !budget;
    if (budget) {
      $("budget-plan").textContent =
        `Time budget ${FT.duration(budget.budget_seconds)}: ${budget.reason} ` +
        `(estimated ${FT.duration(budget.estimated_seconds)} in all).`;
    }
    const finder = choices.lr_finder;
    $("lr-finder").hidden = !finder;
    if (!finder || typeof Chart === "undefined") return;
    $("lr-chosen").textContent = FT.num(finder.lr);
    $("lr-method").textContent = finder.method;
    const points = finder.lrs.map((lr, i) => ({ x: lr, y: finder.losses[i] }));
    if (lrChart) lrChart.destroy();
    lrChart = new Chart($("lr-chart"), {
      type: "scatter",
      data: {
        datasets: [
          { label: "smoothed loss", data: points, showLine: true, pointRadius: 0, borderColor: COLORS.train },
          {
            label: "chosen rate",
            data: [{ x: finder.lr, y: Math.min(...finder.losses.filter(Number.isFinite)) }],
            pointRadius: 6,
            backgroundColor: COLORS.val,
            borderColor: COLORS.val,
          },
        ],
      },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        plugins: { legend: { position: "bottom" } },
        scales: {
          x: { type: "logarithmic", title: { display: true, text: "learning rate" } },
          y: { title: { display: true, text: "loss" } },
        },
      },
    });
  }

  // -- metrics table --------------------------------------------------------------------------------
  const tbody = $("metrics-table").querySelector("tbody");
  function metricRow(m, best) {
    const td = (text, cls) => FT.el("td", { class: cls, text });
    return FT.el(
      "tr",
      { "data-epoch": m.epoch },
      td(m.epoch, "num"),
      td(m.stage),
      td(FT.num(m.train_loss), "num"),
      td(FT.pct(m.train_acc), "num"),
      td(FT.num(m.val_loss), "num"),
      td(FT.pct(m.val_acc), "num"),
      td(FT.num(m.lr), "num"),
      td(FT.seconds(m.epoch_time), "num"),
      FT.el("td", {}, best ? FT.el("span", { class: "best", text: "best" }) : null),
    );
  }

  function renderMetrics() {
    const sorted = [...metrics.values()].sort((a, b) => a.epoch - b.epoch);
    // Each improvement was "best" when it came; only the latest one still is.
    const best = sorted.filter((m) => m.is_best).map((m) => m.epoch).pop();
    tbody.replaceChildren(...sorted.map((m) => metricRow(m, m.epoch === best)));
    $("no-metrics").hidden = sorted.length > 0;
    redrawCharts(sorted);
  }

  function addMetric(m) {
    metrics.set(m.epoch, m);
    renderMetrics();
  }

  function resetMetrics(list) {
    metrics.clear();
    for (const m of list) metrics.set(m.epoch, m);
    renderMetrics();
  }

  // -- job state ------------------------------------------------------------------------------------
  function renderJob(job) {
    const changed = JSON.stringify(job.choices || null) !== JSON.stringify((current && current.choices) || null);
    current = job;
    if (changed || !lrChart) renderChoices(job.choices);
    const badge = FT.el("span", { class: `badge badge-${job.status}`, "data-status": job.status, text: STATUS_LABELS[job.status] || job.status });
    $("job-badge").replaceChildren(badge);
    $("job-stage").textContent = job.stage || "";
    $("job-message").textContent = job.message || "";
    const percent = Math.max(0, Math.min(1, job.progress || 0)) * 100;
    const bar = $("job-progress").querySelector(".progress");
    bar.setAttribute("aria-valuenow", String(Math.round(percent)));
    bar.querySelector(".progress-bar").style.width = `${percent.toFixed(1)}%`;
    $("job-percent").textContent = `${Math.round(percent)}%`;
    $("job-epoch").textContent = `${job.epoch} / ${job.total_epochs || "–"}`;
    $("job-eta").textContent = job.status === "running" && job.eta_seconds != null ? FT.duration(job.eta_seconds) : "–";
    if (job.started_at) $("job-started").textContent = FT.localTime(job.started_at);
    $("job-speed").textContent = job.images_per_sec ? `${Math.round(job.images_per_sec)} img/s` : "–";
    if (job.error) {
      $("job-error-text").textContent = job.error;
      $("job-error-hint").textContent =
        job.status === "failed" ? "Fix the cause and resume: training continues from the last checkpoint." : "";
      $("job-error").hidden = false;
    } else {
      $("job-error").hidden = true;
    }
    // A killed process or a lost worker is retried on its own; say so, with the reason.
    $("job-retries").hidden = !job.retries;
    if (job.retries) {
      $("job-retries").firstChild.textContent = `Retried automatically ${job.retries} time(s); last: `;
      $("job-retry-reason").textContent = job.retry_reason || "";
    }
    $("cancel-button").hidden = !(job.status === "queued" || job.status === "running");
    $("cancel-button").disabled = !!job.cancel_requested;
    $("resume-button").hidden = !(job.status === "failed" || job.status === "cancelled");
    const link = $("model-link");
    if (job.model_id) {
      link.href = `/models/${encodeURIComponent(job.model_id)}`;
      link.hidden = false;
    } else {
      link.hidden = true;
    }
    document.title = `${STATUS_LABELS[job.status] || job.status} ${Math.round(percent)}% · job ${job.id.slice(0, 8)} · finetune`;
  }

  // -- live updates ---------------------------------------------------------------------------------
  function connect() {
    if (source) source.close();
    source = new EventSource(`/api/v1/jobs/${encodeURIComponent(jobId)}/events`);
    source.addEventListener("open", () => {
      $("live-indicator").textContent = "Live updates on.";
      $("live-indicator").hidden = false;
    });
    source.addEventListener("job", (e) => renderJob(JSON.parse(e.data)));
    source.addEventListener("reset", (e) => resetMetrics(JSON.parse(e.data).metrics));
    source.addEventListener("metric", (e) => addMetric(JSON.parse(e.data)));
    source.addEventListener("end", () => {
      source.close();
      source = null;
      $("live-indicator").hidden = true;
    });
    source.addEventListener("error", () => {
      if (source && source.readyState !== EventSource.CLOSED) {
        $("live-indicator").textContent = "Connection lost; reconnecting…";
        $("live-indicator").hidden = false;
      }
    });
  }

  async function action(path, button) {
    FT.hide($("action-error"));
    button.disabled = true;
    try {
      const job = await FT.api("POST", `/api/v1/jobs/${encodeURIComponent(jobId)}/${path}`);
      renderJob(job);
      if (!FINISHED.has(job.status) && !source) connect();
    } catch (e) {
      FT.show($("action-error"), e.message);
    } finally {
      button.disabled = false;
    }
  }

  $("cancel-button").addEventListener("click", (e) => {
    if (window.confirm("Cancel this job? You can resume it later from its last checkpoint.")) action("cancel", e.currentTarget);
  });
  $("resume-button").addEventListener("click", (e) => action("resume", e.currentTarget));

  resetMetrics(initial.metrics || []);
  renderJob(initial);
  if (!FINISHED.has(initial.status)) connect();
  window.jobPage = { lossChart, accChart, metrics, current: () => current };
});
