// Shared helpers for the pages: API calls with the service's error shape, formatting, local times.
// User-supplied text is only ever inserted with textContent, never as HTML.
"use strict";

window.FT = (() => {
  class ApiError extends Error {
    constructor(status, body) {
      const err = body && body.error;
      super(err && err.message ? err.message : `request failed (HTTP ${status})`);
      this.status = status;
      this.code = err ? err.code : "http_error";
      this.details = err ? err.details : undefined;
    }
  }

  /** The session's CSRF token (from the page): every state-changing request made with the cookie sends it. */
  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  /** fetch() a JSON API; resolves with the parsed body, rejects with ApiError (the API's own message). */
  async function api(method, url, body) {
    const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (method !== "GET" && method !== "HEAD") init.headers["X-CSRF-Token"] = csrfToken();
    if (body instanceof FormData) {
      init.body = body;
    } else if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (e) {
      throw new ApiError(0, { error: { code: "network", message: "the server could not be reached: " + e.message } });
    }
    let data = null;
    const text = await response.text();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (e) {
        data = { error: { code: "bad_response", message: text.slice(0, 300) } };
      }
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "style") Object.assign(node.style, v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function show(node, message) {
    if (!node) return;
    if (message !== undefined) node.textContent = message;
    node.hidden = false;
  }

  function hide(node) {
    if (node) node.hidden = true;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    const mm = String(Math.floor(s / 60) % 60).padStart(2, "0");
    const ss = String(s % 60).padStart(2, "0");
    return s >= 3600 ? `${Math.floor(s / 3600)}:${mm}:${ss}` : `${Math.floor(s / 60)}:${ss}`;
  }

  /** An epoch's time: seconds with a decimal under a minute, else m:ss. */
  function seconds(value) {
    if (typeof value !== "number" || !isFinite(value)) return "–";
    return value < 60 ? `${value.toFixed(1)} s` : duration(value);
  }

  function localTime(iso) {
    // The API's times are UTC; SQLite-backed rows come back without an offset.
    if (typeof iso === "string" && !/(Z|[+-]\d\d:?\d\d)$/i.test(iso)) iso += "Z";
    const d = new Date(iso);
    return isNaN(d) ? "–" : new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" }).format(d);
  }

  function pct(value, digits = 1) {
    return typeof value === "number" && isFinite(value) ? (value * 100).toFixed(digits) + "%" : "–";
  }

  function num(value, digits = 4) {
    if (typeof value !== "number" || !isFinite(value)) return "–";
    if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return String(Number(value.toPrecision(digits)));
    return String(Number(value.toFixed(digits)));
  }

  function bytes(n) {
    const units = ["B", "KB", "MB", "GB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
  }

  /** <time datetime="..."> elements rendered in UTC by the server, shown in the browser's time zone. */
  function localizeTimes(root) {
    const fmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
    for (const t of root.querySelectorAll("time[datetime]")) {
      const d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) {
        t.title = t.textContent;
        t.textContent = fmt.format(d);
      }
    }
  }

  document.addEventListener("DOMContentLoaded", () => localizeTimes(document));

  return { ApiError, api, csrfToken, el, show, hide, duration, seconds, localTime, pct, num, bytes, localizeTimes };
})();
