/* The dashboard: plain JavaScript, no dependencies. It talks to the service's own /v1 API with the
   API key the user enters (kept in localStorage, sent as "Authorization: Bearer"). Pages:
     /dashboard                 jobs list, refreshed every few seconds
     /dashboard/jobs/{id}       one job: progress, live loss curves (Server-Sent Events read with fetch,
                                since EventSource cannot send a header), evaluation, downloads
     /dashboard/models          models list
     /dashboard/models/{id}     one model: evaluation, download, predict / completion try-out */
(() => {
  "use strict";

  const ROOT = document.body.dataset.root || "";
  const API = ROOT + "/v1";
  const KEY_STORE = "distill.apiKey";
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const LIST_REFRESH_MS = 3000;
  const JOB_REFRESH_MS = 1500;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const view = document.getElementById("view");
  const keyView = document.getElementById("key-view");
  const keyForm = document.getElementById("key-form");
  const keyInput = document.getElementById("api-key");
  const keyError = document.getElementById("key-error");
  const forgetKey = document.getElementById("forget-key");
  const announcer = document.getElementById("announce");

  let active = null; // the shown page: {controller: AbortController, timers: Set}

  // ---- small helpers ----------------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") el.textContent = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
  }

  function announce(text) {
    announcer.textContent = text;
  }

  function fmt(value) {
    if (value === null || value === undefined) return "—";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value !== "number") return typeof value === "object" ? JSON.stringify(value) : String(value);
    if (!Number.isFinite(value)) return String(value);
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en-US");
    return String(Number(value.toPrecision(4)));
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + " s";
    const m = Math.floor(seconds / 60), s = seconds % 60;
    if (m < 60) return m + " min " + s + " s";
    const hours = Math.floor(m / 60);
    if (hours < 48) return hours + " h " + (m % 60) + " min";
    return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
  }

  const now = () => Date.now() / 1000;

  function age(unix) {
    return unix ? duration(now() - unix) + " ago" : "—";
  }

  function isoTime(unix) {
    return unix ? new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC") : "—";
  }

  function timeEl(unix, text) {
    return h("time", { datetime: unix ? new Date(unix * 1000).toISOString() : null, title: isoTime(unix) },
      text === undefined ? age(unix) : text);
  }

  function link(path, text, attrs) {
    return h("a", { href: ROOT + path, "data-link": true, ...(attrs || {}) }, text);
  }

  function badge(status) {
    return h("span", { class: "badge badge-" + status, "data-status": status }, status);
  }

  function errorBox(message) {
    return h("p", { class: "error", role: "alert" }, message);
  }

  // ---- the API ----------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, param) {
      super(message);
      this.status = status;
      this.param = param;
    }
  }

  function apiKey() {
    try { return localStorage.getItem(KEY_STORE) || ""; } catch (e) { return ""; }
  }

  async function problemOf(response) {
    let body = null;
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    // RFC 9457 problem details, or OpenAI's {"error": {...}} on the OpenAI-shaped routes.
    const error = body && typeof body.error === "object" && body.error !== null ? body.error : null;
    const message = (body && (body.detail || body.title)) || (error && error.message) ||
      (response.status + " " + response.statusText);
    const param = (body && body.param) || (error && error.param) || null;
    return new ApiError(response.status, param ? message + " (" + param + ")" : message, param);
  }

  async function api(path, options) {
    const { method = "GET", body, signal, raw = false, headers = {} } = options || {};
    const init = { method, signal, headers: { Authorization: "Bearer " + apiKey(), ...headers } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(API + path, init);
    if (response.status === 401) {
      const problem = await problemOf(response);
      askForKey("The API key was refused: " + problem.message);
      throw problem;
    }
    if (!response.ok) throw await problemOf(response);
    return raw ? response : response.json();
  }

  async function listAll(path, wanted, signal) {
    // Pages of at most 100 until `wanted` rows (the API's cursor pagination: after=<last id>).
    const rows = [];
    let after = null, more = true;
    while (more && rows.length < wanted) {
      const limit = Math.min(100, wanted - rows.length);
      const sep = path.includes("?") ? "&" : "?";
      const page = await api(path + sep + "limit=" + limit + (after ? "&after=" + encodeURIComponent(after) : ""),
        { signal });
      rows.push(...page.data);
      more = page.has_more;
      after = page.last_id;
    }
    return { rows, more };
  }

  function filenameOf(disposition) {
    if (!disposition) return null;
    const star = /filename\*\s*=\s*UTF-8''([^;]+)/i.exec(disposition);
    if (star) { try { return decodeURIComponent(star[1].trim()); } catch (e) { /* fall through */ } }
    const plain = /filename\s*=\s*"?([^";]+)"?/i.exec(disposition);
    return plain ? plain[1].trim() : null;
  }

  async function download(path, fallbackName, button, statusEl) {
    // A plain link cannot send the API key: fetch the bytes with it, then save them as a file.
    button.disabled = true;
    statusEl.textContent = "Downloading…";
    statusEl.classList.remove("error");
    try {
      const response = await api(path, { raw: true });
      const blob = await response.blob();
      const name = filenameOf(response.headers.get("Content-Disposition")) || fallbackName;
      const url = URL.createObjectURL(blob);
      const anchor = h("a", { href: url, download: name, hidden: true });
      document.body.append(anchor);
      anchor.click();
      anchor.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      statusEl.textContent = "Saved " + name + " (" + bytes(blob.size) + ")";
    } catch (e) {
      statusEl.textContent = "Download failed: " + e.message;
      statusEl.classList.add("error");
    } finally {
      button.disabled = false;
    }
  }

  function downloadButton(label, path, fallbackName, extra) {
    const status = h("span", { class: "download-status", role: "status" });
    const button = h("button", { type: "button", class: "download", ...(extra || {}) }, label);
    button.addEventListener("click", () => download(path, fallbackName, button, status));
    return h("span", { class: "download-item" }, button, " ", status);
  }

  // ---- Server-Sent Events over fetch ------------------------------------------------------------------

  /* Reads GET .../events?stream=true and calls onEvent(event object) for every message. Resolves when
     the server ends the stream; rejects on a network error or a non-2xx answer. */
  async function readEventStream(path, lastId, onEvent, signal) {
    const headers = { Accept: "text/event-stream" };
    if (lastId !== null && lastId !== undefined) headers["Last-Event-ID"] = String(lastId);
    const response = await api(path, { raw: true, signal, headers });
    if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      throw new Error("the server did not answer with an event stream");
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
        if (line === "") { // end of one message
          if (data.length) {
            try { onEvent(JSON.parse(data.join("\n"))); } catch (e) { if (!(e instanceof SyntaxError)) throw e; }
          }
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        } // id:, event:, retry: and ": comments" need nothing here: the data carries the id and type
      }
    }
  }

  // ---- pages ------------------------------------------------------------------------------------------

  function startPage() {
    if (active) {
      active.controller.abort();
      active.timers.forEach((t) => clearTimeout(t));
    }
    active = { controller: new AbortController(), timers: new Set() };
    return active;
  }

  function later(page, fn, ms) {
    const timer = setTimeout(() => { page.timers.delete(timer); if (!page.controller.signal.aborted) fn(); }, ms);
    page.timers.add(timer);
  }

  function alive(page) {
    return page === active && !page.controller.signal.aborted;
  }

  function show(title, ...content) {
    document.title = title + " · Distillation dashboard";
    const heading = h("h1", { tabindex: "-1" }, title);
    view.replaceChildren(heading, ...content);
    return heading;
  }

  function markNav(name) {
    document.querySelectorAll("[data-nav]").forEach((a) => {
      if (a.dataset.nav === name) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    });
  }

  // -- jobs list

  function jobsPage() {
    const page = startPage();
    markNav("jobs");
    let wanted = 25;
    const statusFilter = h("select", { id: "status-filter" },
      h("option", { value: "" }, "all"),
      ["queued", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s }, s)));
    const auto = h("input", { type: "checkbox", id: "auto-refresh", checked: true });
    const updated = h("span", { class: "muted", id: "jobs-updated" });
    const body = h("tbody");
    const more = h("button", { type: "button", hidden: true }, "Show older jobs");
    const problem = h("div");
    const table = h("table", { id: "jobs", class: "data" },
      h("caption", { class: "visually-hidden" }, "Distillation jobs, newest first"),
      h("thead", {}, h("tr", {}, ["Job", "Status", "Progress", "Task", "Created", "Ran for"].map(
        (t) => h("th", { scope: "col" }, t)))),
      body);
    show("Distillation jobs",
      h("div", { class: "toolbar" },
        h("label", { for: "status-filter" }, "Status "), statusFilter,
        h("label", { class: "check" }, auto, " Refresh every " + LIST_REFRESH_MS / 1000 + " s"),
        h("button", { type: "button", onclick: () => refresh() }, "Refresh now"), updated),
      problem, table, more,
      h("p", { class: "muted" }, "Submit jobs with the API, the Python client or the distill CLI; they show up here."));

    let inFlight = false;
    async function refresh() {
      if (inFlight || !alive(page)) return;
      inFlight = true;
      try {
        const query = statusFilter.value ? "?status=" + statusFilter.value : "";
        const { rows, more: hasMore } = await listAll("/distillation/jobs" + query, wanted, page.controller.signal);
        if (!alive(page)) return;
        body.replaceChildren(...(rows.length ? rows.map(jobRow)
          : [h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No jobs yet."))]));
        more.hidden = !hasMore;
        updated.textContent = "Updated " + new Date().toLocaleTimeString("en-GB");
        problem.replaceChildren();
      } catch (e) {
        if (alive(page) && e.status !== 401) problem.replaceChildren(errorBox("Could not load the jobs: " + e.message));
      } finally {
        inFlight = false;
      }
    }

    function loop() {
      if (!alive(page)) return;
      if (auto.checked && !document.hidden) refresh();
      later(page, loop, LIST_REFRESH_MS);
    }

    statusFilter.addEventListener("change", refresh);
    more.addEventListener("click", () => { wanted += 25; refresh(); });
    refresh().then(() => later(page, loop, LIST_REFRESH_MS));
  }

  function progressCell(job) {
    const p = job.progress || {};
    if (!p.total_steps) return h("td", {}, job.status === "queued" ? "waiting" : "—");
    return h("td", { class: "progress-cell" },
      h("progress", { max: p.total_steps, value: p.step, "aria-label": "Progress of " + job.id }),
      " ", h("span", { class: "steps" }, fmt(p.step) + " / " + fmt(p.total_steps)));
  }

  function jobRow(job) {
    const ran = job.started_at ? (job.finished_at || now()) - job.started_at : null;
    return h("tr", { "data-job": job.id },
      h("th", { scope: "row" }, link("/dashboard/jobs/" + job.id, job.id)),
      h("td", {}, badge(job.status)),
      progressCell(job),
      h("td", {}, (job.spec && job.spec.task) || "—"),
      h("td", {}, timeEl(job.created_at)),
      h("td", {}, duration(ran)));
  }

  // -- one job

  function jobPage(jobId) {
    const page = startPage();
    markNav("jobs");
    const state = { job: null, events: [], lastId: null, metrics: [], evaluation: null, totalEpochs: null,
                    finalSeen: false, modelShown: false, streaming: "connecting" };

    const summary = h("dl", { class: "summary", id: "job-summary" });
    const problem = h("div");
    const actions = h("div", { class: "actions", id: "job-actions" });
    const chart = h("div", { id: "loss-chart", class: "chart" });
    const logScale = h("input", { type: "checkbox", id: "log-scale" });
    logScale.addEventListener("change", () => renderChart());
    const metricsTable = h("div");
    const evaluation = h("div", { id: "evaluation-section" }, h("p", { class: "muted" },
      "The evaluation appears when training is done."));
    const eventList = h("ol", { id: "events", class: "events" });
    const live = h("span", { class: "muted", id: "live-state" });

    show("Job " + jobId,
      h("p", {}, link("/dashboard", "← All jobs")),
      problem, summary, actions,
      h("section", { "aria-labelledby": "loss-title" },
        h("h2", { id: "loss-title" }, "Loss"),
        h("label", { class: "check" }, logScale, " Logarithmic scale"), chart, metricsTable),
      h("section", { "aria-labelledby": "eval-title" },
        h("h2", { id: "eval-title" }, "Teacher vs student"), evaluation),
      h("section", { "aria-labelledby": "events-title" },
        h("h2", { id: "events-title" }, "Events ", live), eventList));
    renderChart();

    function renderSummary() {
      const job = state.job;
      if (!job) return;
      const p = job.progress || {};
      const elapsed = job.started_at ? (job.finished_at || now()) - job.started_at : null;
      let eta = null;
      if (job.status === "running" && p.step > 0 && p.total_steps > p.step && elapsed) {
        eta = elapsed * (p.total_steps - p.step) / p.step;
      }
      const spec = job.spec || {};
      const rows = [
        ["Status", h("span", {}, badge(job.status), job.cancel_requested && !FINAL.has(job.status)
          ? " (cancel requested)" : "")],
        ["Progress", p.total_steps
          ? h("span", { class: "progress-cell" },
            h("progress", { max: p.total_steps, value: p.step, "aria-label": "Training progress" }), " ",
            h("span", { id: "job-steps" }, "step " + fmt(p.step) + " of " + fmt(p.total_steps) +
              (p.epoch ? ", epoch " + p.epoch + (state.totalEpochs ? " of " + state.totalEpochs : "") : "") +
              (eta !== null ? ", about " + duration(eta) + " left" : "")))
          : (job.status === "queued" ? "waiting for a worker" : "—")],
        ["Task", [spec.task, spec.method && spec.task === "causal_lm" ? "(" + spec.method + ")" : null]
          .filter(Boolean).join(" ") || "—"],
        ["Loss", spec.loss ? spec.loss.type : "—"],
        ["Device", job.device || "—"],
        ["Created", timeEl(job.created_at, isoTime(job.created_at) + " (" + age(job.created_at) + ")")],
        ["Started", timeEl(job.started_at, isoTime(job.started_at))],
        ["Finished", timeEl(job.finished_at, isoTime(job.finished_at))],
        ["Ran for", duration(elapsed)],
      ];
      if (job.result_model_id) {
        rows.push(["Model", link("/dashboard/models/" + job.result_model_id, job.result_model_id)]);
      }
      if (job.error) {
        rows.push(["Error", h("span", { class: "error" }, job.error.message +
          (job.error.param ? " (" + job.error.param + ")" : "") + " [" + job.error.code + "]")]);
      }
      summary.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
      renderActions();
    }

    function renderActions() {
      const job = state.job;
      const items = [];
      if (!FINAL.has(job.status) && !job.cancel_requested) {
        const cancel = h("button", { type: "button", class: "danger", id: "cancel-job" }, "Cancel job");
        cancel.addEventListener("click", async () => {
          if (!window.confirm("Cancel " + job.id + "?")) return;
          cancel.disabled = true;
          try {
            state.job = await api("/distillation/jobs/" + job.id + "/cancel", { method: "POST" });
            renderSummary();
          } catch (e) {
            problem.replaceChildren(errorBox("Could not cancel: " + e.message));
            cancel.disabled = false;
          }
        });
        items.push(cancel);
      }
      if (job.result_model_id) {
        const model = job.result_model_id;
        items.push(downloadButton("Download model", "/models/" + model + "/download", model,
          { id: "download-model" }));
        if (job.spec && job.spec.student && job.spec.student.lora) {
          items.push(downloadButton("Download LoRA adapter", "/models/" + model + "/download?format=adapter",
            model + "-adapter.tar.gz", { id: "download-adapter" }));
        }
      }
      (job.result_files || []).forEach((fileId) => {
        items.push(downloadButton("Download " + fileId, "/files/" + fileId + "/content", fileId));
      });
      // Keep the buttons (and a download in progress) when nothing changed.
      const signature = items.map((el) => el.textContent).join("|");
      if (actions.dataset.signature !== signature) {
        actions.dataset.signature = signature;
        actions.replaceChildren(...items);
      }
    }

    function onEvent(event) {
      if (state.lastId !== null && event.id <= state.lastId) return; // already seen (a resumed stream)
      state.lastId = event.id;
      state.events.push(event);
      const data = event.data || {};
      if (event.type === "metrics" && typeof data.epoch === "number") {
        state.metrics = state.metrics.filter((m) => m.epoch < data.epoch); // a resumed attempt repeats epochs
        state.metrics.push(data);
        renderChart();
      } else if (event.type === "evaluation") {
        state.evaluation = data;
        if (!state.modelShown) renderEvaluation(data, null);
      } else if (event.type === "stage") {
        if (data.stage === "training" && data.epochs) { state.totalEpochs = data.epochs; renderChart(); }
        if (FINAL.has(data.stage)) {
          state.finalSeen = true;
          announce("Job " + jobId + " " + data.stage);
          refreshJob();
        }
      }
      const atBottom = eventList.scrollTop + eventList.clientHeight >= eventList.scrollHeight - 4;
      eventList.append(eventItem(event));
      if (atBottom) eventList.scrollTop = eventList.scrollHeight;
      while (eventList.children.length > 500) eventList.firstChild.remove();
    }

    function eventItem(event) {
      return h("li", { "data-type": event.type },
        timeEl(event.created_at, isoTime(event.created_at).slice(11)), " ",
        h("span", { class: "event-type" }, event.type), " ", event.message || "");
    }

    function renderChart() {
      chart.replaceChildren(lossChart(state.metrics, state.totalEpochs, logScale.checked));
      metricsTable.replaceChildren(metricsDetails(state.metrics));
    }

    async function showModel(modelId) {
      try {
        const model = await api("/models/" + modelId, { signal: page.controller.signal });
        if (!alive(page)) return;
        state.modelShown = true;
        renderEvaluation(model.evaluation, model);
      } catch (e) {
        if (alive(page) && e.status !== 401) {
          evaluation.replaceChildren(errorBox("Could not load the model: " + e.message));
        }
      }
    }

    function renderEvaluation(data, model) {
      const parts = [evaluationTable(data)];
      if (model) parts.unshift(h("p", { class: "muted" }, "From ", link("/dashboard/models/" + model.id, model.id),
        ", measured on " + fmt(data && data.device) + "."));
      evaluation.replaceChildren(...parts);
    }

    let jobInFlight = false;
    async function refreshJob() {
      if (jobInFlight || !alive(page)) return;
      jobInFlight = true;
      try {
        const job = await api("/distillation/jobs/" + jobId, { signal: page.controller.signal });
        if (!alive(page)) return;
        const wasFinal = state.job && FINAL.has(state.job.status);
        state.job = job;
        problem.replaceChildren();
        renderSummary();
        if (FINAL.has(job.status) && !wasFinal) {
          if (job.result_model_id) showModel(job.result_model_id);
          else if (!state.evaluation) evaluation.replaceChildren(h("p", { class: "muted" },
            "No evaluation: the job " + job.status + "."));
        }
      } catch (e) {
        if (!alive(page) || e.name === "AbortError" || e.status === 401) return;
        problem.replaceChildren(errorBox(e.status === 404 ? "There is no job " + jobId + "."
          : "Could not load the job: " + e.message));
      } finally {
        jobInFlight = false;
      }
    }

    function jobLoop() {
      if (!alive(page)) return;
      if (state.job && FINAL.has(state.job.status)) { renderSummary(); return; }
      if (!document.hidden) refreshJob();
      later(page, jobLoop, JOB_REFRESH_MS);
    }

    async function pollEvents() {
      // Fallback when the stream cannot be read: the paged list, after the last id seen.
      for (;;) {
        const query = "?limit=1000" + (state.lastId !== null ? "&after=" + state.lastId : "");
        const events = await api("/distillation/jobs/" + jobId + "/events" + query, { signal: page.controller.signal });
        events.data.forEach(onEvent);
        if (!events.has_more) return;
      }
    }

    async function follow() {
      let failures = 0;
      while (alive(page)) {
        try {
          live.textContent = "(live)";
          await readEventStream("/distillation/jobs/" + jobId + "/events?stream=true", state.lastId, onEvent,
            page.controller.signal);
          failures = 0;
        } catch (e) {
          if (!alive(page) || e.name === "AbortError" || e.status === 401) return;
          if (e.status === 404) { live.textContent = ""; return; }
          failures += 1;
          live.textContent = "(reconnecting…)";
          try { await pollEvents(); } catch (inner) { /* the next round tries again */ }
        }
        if (!alive(page)) return;
        const job = state.job;
        if (state.finalSeen || (job && FINAL.has(job.status) && failures === 0)) break;
        await new Promise((resolve) => later(page, resolve, Math.min(1000 * 2 ** failures, 10000)));
      }
      if (alive(page)) {
        try { await pollEvents(); } catch (e) { /* shown already */ } // anything after the final stage
        live.textContent = "";
      }
    }

    refreshJob().then(() => later(page, jobLoop, JOB_REFRESH_MS));
    follow();
  }

  // -- charts and tables

  function lossChart(points, totalEpochs, logScale) {
    const width = 640, height = 280, left = 56, right = 16, top = 16, bottom = 40;
    const series = [
      { key: "train_loss", label: "training loss", cls: "train" },
      { key: "validation_loss", label: "validation loss", cls: "validation" },
    ].map((s) => ({ ...s, values: points.filter((p) => typeof p[s.key] === "number" && Number.isFinite(p[s.key]) &&
      (!logScale || p[s.key] > 0)).map((p) => [p.epoch, p[s.key]]) }));
    const all = series.flatMap((s) => s.values.map((v) => v[1]));
    const maxEpoch = Math.max(1, totalEpochs || 0, ...points.map((p) => p.epoch));
    const x = (epoch) => left + (maxEpoch === 1 ? (width - left - right) / 2
      : (epoch - 1) / (maxEpoch - 1) * (width - left - right));
    const plotHeight = height - top - bottom;
    let y, ticks;
    if (logScale && all.length) {
      const lo = Math.floor(Math.log10(Math.min(...all))), hi = Math.max(lo + 1, Math.ceil(Math.log10(Math.max(...all))));
      y = (v) => top + (1 - (Math.log10(v) - lo) / (hi - lo)) * plotHeight;
      ticks = [];
      for (let e = lo; e <= hi; e += Math.max(1, Math.ceil((hi - lo) / 6))) ticks.push(10 ** e);
    } else {
      const maxY = all.length ? Math.max(...all) : 1;
      const step = niceStep((maxY > 0 ? maxY : 1) / 4);
      const yTop = step * Math.max(1, Math.ceil(maxY / step - 1e-9));
      y = (v) => top + (1 - Math.max(0, v) / yTop) * plotHeight;
      ticks = [];
      for (let v = 0; v <= yTop + step / 2; v += step) ticks.push(Number(v.toPrecision(6)));
    }

    const grid = [], labels = [];
    ticks.forEach((v) => {
      grid.push(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }));
      labels.push(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, fmt(v)));
    });
    const every = Math.max(1, Math.ceil(maxEpoch / 10));
    for (let e = 1; e <= maxEpoch; e += every) {
      labels.push(svg("text", { x: x(e), y: height - bottom + 16, "text-anchor": "middle", class: "tick" }, String(e)));
    }
    const desc = all.length
      ? series.filter((s) => s.values.length).map((s) => s.label + " " +
        s.values.map((v) => "epoch " + v[0] + ": " + fmt(v[1])).join(", ")).join("; ")
      : "No epochs finished yet.";
    const drawn = series.filter((s) => s.values.length).map((s) => svg("g", { class: "series " + s.cls },
      svg("path", { class: "line " + s.cls, "data-series": s.key, "data-points": s.values.length, fill: "none",
        d: s.values.map((v, i) => (i ? "L" : "M") + x(v[0]).toFixed(1) + " " + y(v[1]).toFixed(1)).join(" ") }),
      s.values.map((v) => svg("circle", { cx: x(v[0]).toFixed(1), cy: y(v[1]).toFixed(1), r: 3.5, class: "dot " + s.cls },
        svg("title", {}, s.label + ", epoch " + v[0] + ": " + fmt(v[1]))))));
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", class: "loss-chart",
      "aria-labelledby": "loss-chart-title loss-chart-desc", "data-epochs": points.length,
      "data-scale": logScale ? "log" : "linear" },
      svg("title", { id: "loss-chart-title" }, "Training and validation loss by epoch" + (logScale ? " (log scale)" : "")),
      svg("desc", { id: "loss-chart-desc" }, desc),
      grid,
      svg("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }),
      svg("line", { x1: left, x2: left, y1: top, y2: height - bottom, class: "axis" }),
      labels,
      svg("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle", class: "axis-label" }, "epoch"),
      drawn);
    const legend = h("ul", { class: "legend" }, series.map((s) => h("li", { class: s.cls },
      h("span", { class: "swatch " + s.cls, "aria-hidden": "true" }), s.label +
      (s.values.length ? " (last " + fmt(s.values[s.values.length - 1][1]) + ")" : " (none yet)"))));
    return h("figure", {}, chart, h("figcaption", {}, legend));
  }

  function niceStep(raw) {
    const power = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= raw) return m * power;
    return 10 * power;
  }

  function metricsDetails(points) {
    if (!points.length) return h("p", { class: "muted" }, "Curves appear after the first epoch.");
    const keys = [];
    points.forEach((p) => Object.keys(p).forEach((k) => {
      if (k !== "epoch" && typeof p[k] === "number" && !keys.includes(k)) keys.push(k);
    }));
    return h("details", {},
      h("summary", {}, "Per-epoch metrics as a table"),
      h("table", { class: "data", id: "epoch-metrics" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "epoch"), keys.map((k) => h("th", { scope: "col" }, k)))),
        h("tbody", {}, points.map((p) => h("tr", {}, h("th", { scope: "row" }, String(p.epoch)),
          keys.map((k) => h("td", {}, fmt(p[k]))))))));
  }

  function evaluationTable(data) {
    if (!data || !Object.keys(data).length) return h("p", { class: "muted" }, "No evaluation recorded.");
    const teacher = data.teacher || {}, student = data.student || {};
    const keys = [];
    [teacher, student].forEach((side) => Object.keys(side).forEach((k) => { if (!keys.includes(k)) keys.push(k); }));
    const comparison = Object.keys(data).filter((k) => !["teacher", "student", "teachers", "device"].includes(k));
    const nodes = [h("table", { class: "data evaluation", id: "evaluation" },
      h("caption", {}, "Teacher and student on the validation data"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "metric"), h("th", { scope: "col" }, "teacher"),
        h("th", { scope: "col" }, "student"))),
      h("tbody", {}, keys.map((k) => h("tr", { "data-metric": k }, h("th", { scope: "row" }, k.replaceAll("_", " ")),
        h("td", {}, fmt(teacher[k])), h("td", {}, fmt(student[k]))))))];
    if (comparison.length) {
      nodes.push(h("table", { class: "data evaluation", id: "comparison" },
        h("caption", {}, "Student compared with teacher"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "measure"), h("th", { scope: "col" }, "value"))),
        h("tbody", {}, comparison.map((k) => h("tr", {}, h("th", { scope: "row" }, k.replaceAll("_", " ")),
          h("td", {}, fmt(data[k])))))));
    }
    if (Array.isArray(data.teachers) && data.teachers.length) {
      nodes.push(h("details", {}, h("summary", {}, "Each teacher"), h("pre", {}, JSON.stringify(data.teachers, null, 2))));
    }
    return h("div", { class: "evaluation-tables" }, nodes);
  }

  // -- models

  function modelsPage() {
    const page = startPage();
    markNav("models");
    let wanted = 25;
    const body = h("tbody");
    const problem = h("div");
    const more = h("button", { type: "button", hidden: true }, "Show older models");
    show("Models", problem,
      h("table", { class: "data", id: "models" },
        h("caption", { class: "visually-hidden" }, "Models, newest first"),
        h("thead", {}, h("tr", {}, ["Model", "Task", "Kind", "Parameters", "Size", "Created", "From job"].map(
          (t) => h("th", { scope: "col" }, t)))),
        body),
      more);

    async function refresh() {
      try {
        const { rows, more: hasMore } = await listAll("/models", wanted, page.controller.signal);
        if (!alive(page)) return;
        body.replaceChildren(...(rows.length ? rows.map((m) => h("tr", { "data-model": m.id },
          h("th", { scope: "row" }, link("/dashboard/models/" + m.id, m.id)),
          h("td", {}, m.task), h("td", {}, m.kind), h("td", {}, fmt(m.parameters)), h("td", {}, bytes(m.size_bytes)),
          h("td", {}, timeEl(m.created_at)),
          h("td", {}, m.job_id ? link("/dashboard/jobs/" + m.job_id, m.job_id) : "uploaded")))
          : [h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No models yet: they appear when a job succeeds."))]));
        more.hidden = !hasMore;
      } catch (e) {
        if (alive(page) && e.status !== 401) problem.replaceChildren(errorBox("Could not load the models: " + e.message));
      }
    }
    more.addEventListener("click", () => { wanted += 25; refresh(); });
    refresh();
  }

  async function modelPage(modelId) {
    const page = startPage();
    markNav("models");
    const problem = h("div");
    show("Model " + modelId, h("p", {}, link("/dashboard/models", "← All models")), problem);
    let model;
    try {
      model = await api("/models/" + modelId, { signal: page.controller.signal });
    } catch (e) {
      if (alive(page) && e.status !== 401) {
        problem.replaceChildren(errorBox(e.status === 404 ? "There is no model " + modelId + "." : e.message));
      }
      return;
    }
    if (!alive(page)) return;
    const arch = model.architecture || {};
    const rows = [
      ["Task", model.task], ["Kind", model.kind], ["Parameters", fmt(model.parameters)],
      ["Size", bytes(model.size_bytes)], ["SHA-256", h("code", { class: "hash" }, model.sha256)],
      ["Created", timeEl(model.created_at, isoTime(model.created_at) + " (" + age(model.created_at) + ")")],
      ["From job", model.job_id ? link("/dashboard/jobs/" + model.job_id, model.job_id) : "uploaded"],
      ["Architecture", h("details", {}, h("summary", {}, arch.model_type || arch.kind || "details"),
        h("pre", { class: "json" }, JSON.stringify(arch, null, 2)))],
    ];
    const downloads = [downloadButton("Download model", "/models/" + model.id + "/download", model.id,
      { id: "download-model" })];
    view.append(
      h("dl", { class: "summary" }, rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      h("div", { class: "actions" }, downloads),
      h("section", { "aria-labelledby": "eval-title" }, h("h2", { id: "eval-title" }, "Teacher vs student"),
        evaluationTable(model.evaluation)),
      tryOut(model));
  }

  function tryOut(model) {
    const output = h("div", { id: "try-output", "aria-live": "polite" });
    const section = h("section", { "aria-labelledby": "try-title" }, h("h2", { id: "try-title" }, "Try it"));
    const busy = (form, on) => form.querySelectorAll("button, textarea, input").forEach((el) => { el.disabled = on; });

    if (model.task === "classification" || model.task === "text_classification") {
      const numeric = model.task === "classification";
      const features = model.architecture && model.architecture.input_dim;
      const input = h("textarea", { id: "predict-input", rows: 5, cols: 60, spellcheck: "false", required: true });
      input.value = numeric ? Array(features || 4).fill("0").join(", ") : "a text to classify";
      const form = h("form", { id: "predict-form" },
        h("label", { for: "predict-input" }, numeric
          ? "Rows of " + (features ? features + " " : "") + "comma-separated numbers, one per line"
          : "Texts, one per line"),
        input, h("div", {}, h("button", { type: "submit" }, "Predict")));
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        const lines = input.value.split("\n").map((l) => l.trim()).filter(Boolean);
        let inputs;
        if (numeric) {
          inputs = lines.map((l) => l.split(/[\s,;]+/).filter(Boolean).map(Number));
          if (!inputs.length || inputs.some((r) => r.some((v) => !Number.isFinite(v)))) {
            output.replaceChildren(errorBox("Every line must be numbers separated by commas."));
            return;
          }
        } else {
          inputs = lines;
        }
        busy(form, true);
        try {
          const result = await api("/models/" + model.id + "/predict", { method: "POST", body: { inputs } });
          output.replaceChildren(h("table", { class: "data", id: "predictions" },
            h("caption", {}, "Predictions"),
            h("thead", {}, h("tr", {}, ["input", "label", "probabilities"].map((t) => h("th", { scope: "col" }, t)))),
            h("tbody", {}, result.predictions.map((p, i) => h("tr", {},
              h("th", { scope: "row" }, numeric ? inputs[i].join(", ") : inputs[i]),
              h("td", { class: "label" }, String(p.label)),
              h("td", {}, p.probabilities.map((v) => fmt(v)).join(", ")))))));
        } catch (err) {
          output.replaceChildren(errorBox(err.message));
        } finally {
          busy(form, false);
        }
      });
      section.append(form, output);
    } else if (model.task === "causal_lm") {
      const prompt = h("textarea", { id: "prompt", rows: 4, cols: 60, required: true });
      const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: 32 });
      const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
      const form = h("form", { id: "completion-form" },
        h("label", { for: "prompt" }, "Prompt"), prompt,
        h("div", { class: "inline-fields" },
          h("label", { for: "max-tokens" }, "Max tokens "), maxTokens,
          h("label", { for: "temperature" }, " Temperature (0 = greedy) "), temperature),
        h("div", {}, h("button", { type: "submit" }, "Complete")));
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        busy(form, true);
        try {
          const result = await api("/completions", { method: "POST", body: {
            model: model.id, prompt: prompt.value, max_tokens: Number(maxTokens.value),
            temperature: Number(temperature.value) } });
          output.replaceChildren(...result.choices.map((c) => h("div", { class: "completion" },
            h("pre", {}, c.text),
            h("p", { class: "muted" }, "finish reason: " + c.finish_reason))),
          h("p", { class: "muted" }, "tokens: " + result.usage.prompt_tokens + " prompt, " +
            result.usage.completion_tokens + " generated"));
        } catch (err) {
          output.replaceChildren(errorBox(err.message));
        } finally {
          busy(form, false);
        }
      });
      section.append(form, output);
    } else {
      section.append(h("p", { class: "muted" }, "No try-out for task " + model.task + "."));
    }
    return section;
  }

  // ---- routing and the key ----------------------------------------------------------------------------

  function route() {
    if (!apiKey()) { askForKey(""); return; }
    keyView.hidden = true;
    view.hidden = false;
    forgetKey.hidden = false;
    const path = location.pathname.slice(ROOT.length).replace(/\/+$/, "");
    let m;
    if ((m = /^\/dashboard\/jobs\/([^/]+)$/.exec(path))) jobPage(decodeURIComponent(m[1]));
    else if ((m = /^\/dashboard\/models\/([^/]+)$/.exec(path))) modelPage(decodeURIComponent(m[1]));
    else if (path === "/dashboard/models") modelsPage();
    else jobsPage();
  }

  function navigate(href) {
    history.pushState(null, "", href);
    route();
    const heading = view.querySelector("h1");
    if (heading) heading.focus();
  }

  function askForKey(message) {
    if (active) { active.controller.abort(); active.timers.forEach((t) => clearTimeout(t)); active = null; }
    view.hidden = true;
    view.replaceChildren();
    keyView.hidden = false;
    forgetKey.hidden = true;
    keyError.textContent = message || "";
    document.title = "API key · Distillation dashboard";
    keyInput.focus();
  }

  keyForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = keyInput.value.trim();
    if (!key) return;
    const button = keyForm.querySelector("button");
    button.disabled = true;
    keyError.textContent = "";
    try {
      const response = await fetch(API + "/models?limit=1", { headers: { Authorization: "Bearer " + key } });
      if (response.status === 401) {
        keyError.textContent = "This key was refused: " + (await problemOf(response)).message;
        return;
      }
      if (!response.ok) {
        keyError.textContent = "The service answered " + (await problemOf(response)).message;
        return;
      }
      localStorage.setItem(KEY_STORE, key);
      keyInput.value = "";
      route();
    } catch (err) {
      keyError.textContent = "The service could not be reached: " + err.message;
    } finally {
      button.disabled = false;
    }
  });

  forgetKey.addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    askForKey("The key was removed from this browser.");
  });

  document.addEventListener("click", (e) => {
    const anchor = e.target.closest && e.target.closest("a[data-link], a[data-nav]");
    if (!anchor || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    if (anchor.dataset.nav === undefined && anchor.dataset.link === undefined) return;
    e.preventDefault();
    navigate(anchor.getAttribute("href"));
  });

  window.addEventListener("popstate", route);
  route();
})();
