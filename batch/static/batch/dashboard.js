/* Live batch dashboard: WebSocket snapshot + events, REST calls for submit and resize; the
 * cancel, pause, resume and retry controls are actions.js's (loaded first).
 * Dependency-free. The page's config comes from the json_script "batch-dashboard-config". */
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("batch-dashboard-config").textContent);
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const SEGMENTS = ["succeeded", "failed", "cancelled", "running"];
  const RATE_WINDOW_MS = 10000;
  const MAX_ITEMS = 50;
  const batches = new Map(); // id -> {data, samples, el, series, lastDone}
  const Charts = window.BatchCharts;
  const overall = new Charts.RateSeries(); // items/s across all batches (overview)
  const durations = new Map(); // item id -> seconds, finished items of this batch (batch page)
  const MAX_DURATIONS = 20000;

  // --- small helpers ---------------------------------------------------------------------

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  const shortId = (b) => b.id.slice(0, 8);
  const label = (b) => b.name || "Batch " + shortId(b);
  const fmtInt = (n) => Number(n || 0).toLocaleString("en-US");
  // Controls only for those allowed (the API enforces it anyway): own batches, or the permission.
  const allowed = (perm, b) => Boolean((config.permissions || {})[perm] || (config.username && b.owner === config.username));

  function fmtDuration(seconds) {
    if (seconds === null || !isFinite(seconds) || seconds < 0) return "–";
    const s = Math.round(seconds);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  }

  function fmtTime(iso) {
    return iso ? new Date(iso).toLocaleTimeString([], { hour12: false }) : "–";
  }

  function csrfToken() {
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  async function api(method, url, body) {
    const response = await fetch(url, {
      method: method,
      credentials: "same-origin",
      headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try {
      data = await response.json();
    } catch (error) {
      data = null;
    }
    return { status: response.status, ok: response.ok, data: data };
  }

  function problemText(result) {
    const data = result.data || {};
    let text = data.detail || data.title || "HTTP " + result.status;
    if (data.errors) text += " " + JSON.stringify(data.errors);
    return text;
  }

  // --- derived numbers -------------------------------------------------------------------

  function finished(b) {
    return b.succeeded_items + b.failed_items + b.cancelled_items;
  }

  function processed(b) {
    return b.succeeded_items + b.failed_items;
  }

  function elapsedSeconds(b) {
    if (!b.started_at) return null;
    const end = b.finished_at ? Date.parse(b.finished_at) : Date.now();
    return Math.max(0, (end - Date.parse(b.started_at)) / 1000);
  }

  function rate(entry) {
    const b = entry.data;
    const elapsed = elapsedSeconds(b);
    const average = elapsed ? processed(b) / elapsed : null;
    if (TERMINAL.has(b.status) || entry.samples.length < 2) return average;
    const first = entry.samples[0];
    const last = entry.samples[entry.samples.length - 1];
    if (last[0] - first[0] < 1000) return average;
    return ((last[1] - first[1]) * 1000) / (last[0] - first[0]);
  }

  function sample(entry) {
    const now = Date.now();
    entry.samples.push([now, processed(entry.data)]);
    while (entry.samples.length > 2 && now - entry.samples[0][0] > RATE_WINDOW_MS) entry.samples.shift();
  }

  function timing(entry) {
    const b = entry.data;
    const speed = rate(entry);
    const remaining = b.pending_items + b.running_items;
    let eta = "–";
    if (TERMINAL.has(b.status)) eta = "done";
    else if (b.status === "cancelling") eta = "draining";
    else if (b.status === "paused") eta = "paused";
    else if (speed > 0) eta = fmtDuration(remaining / speed);
    return {
      rate: speed === null ? "–" : speed.toFixed(speed < 10 ? 1 : 0) + " items/s",
      elapsed: fmtDuration(elapsedSeconds(b)),
      eta: eta,
    };
  }

  // --- rendering ---------------------------------------------------------------------------

  function renderBar(bar, b) {
    const total = b.total_items || 1;
    bar.replaceChildren();
    for (const name of SEGMENTS) {
      const count = b[name + "_items"];
      if (!count) continue;
      const seg = el("span", { class: "bd-seg bd-seg-" + name, title: fmtInt(count) + " " + name });
      seg.style.width = ((100 * count) / total).toFixed(3) + "%";
      bar.append(seg);
    }
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", String(b.total_items));
    bar.setAttribute("aria-valuenow", String(finished(b)));
    bar.title =
      `${fmtInt(b.succeeded_items)} succeeded · ${fmtInt(b.failed_items)} failed · ` +
      `${fmtInt(b.cancelled_items)} cancelled · ${fmtInt(b.running_items)} running · ${fmtInt(b.pending_items)} pending`;
  }

  function setBadge(node, status) {
    node.textContent = status;
    node.className = "bd-badge bd-status-" + status;
  }

  function buildParallel(container, entry) {
    const id = "bd-par-" + entry.data.id;
    const slider = el("input", {
      type: "range", min: "1", max: String(config.globalMaxParallel), step: "1", id: id,
      "aria-label": "Max parallel", dataset: { role: "slider" },
    });
    const label = el("label", { for: id, class: "bd-par-label" }, [
      el("strong", { dataset: { field: "effective" } }), " effective · ",
      el("span", { dataset: { field: "requested" } }), " ",
      el("span", { class: "bd-quiet", dataset: { field: "capnote" } }),
    ]);
    const error = el("span", { class: "bd-error", dataset: { field: "parerror" } });
    slider.addEventListener("input", () => {
      slider.dataset.dragging = "1";
      label.querySelector("[data-field=requested]").textContent = slider.value + " requested";
    });
    slider.addEventListener("change", () => resize(entry, slider, error));
    container.replaceChildren(slider, label, error);
  }

  async function resize(entry, slider, error) {
    const value = Number(slider.value);
    error.textContent = "";
    slider.disabled = true;
    try {
      const result = await api("PATCH", config.apiBatches + entry.data.id + "/", { max_parallel: value });
      if (result.ok && result.data && result.data.id) applyBatch(result.data);
      else if (!result.ok) error.textContent = problemText(result);
    } catch (exc) {
      error.textContent = "Request failed: " + exc;
    } finally {
      delete slider.dataset.dragging;
      slider.disabled = TERMINAL.has(entry.data.status);
      renderParallel(entry);
    }
  }

  function renderParallel(entry) {
    const b = entry.data;
    const box = entry.el.querySelector("[data-field=parallel]");
    if (!box.firstChild) buildParallel(box, entry);
    const slider = box.querySelector("input");
    if (!slider.dataset.dragging) {
      slider.value = String(Math.min(b.max_parallel, config.globalMaxParallel));
      box.querySelector("[data-field=requested]").textContent = b.max_parallel + " requested";
    }
    slider.disabled = TERMINAL.has(b.status) || b.status === "cancelling";
    slider.hidden = TERMINAL.has(b.status) || !allowed("resize", b);
    box.querySelector("[data-field=effective]").textContent = b.effective_parallel;
    box.querySelector("[data-field=capnote]").textContent =
      b.max_parallel > config.globalMaxParallel ? "(capped at " + config.globalMaxParallel + ")" : "";
  }

  function renderTiming(entry) {
    const t = timing(entry);
    for (const key of ["rate", "elapsed", "eta"]) entry.el.querySelector(`[data-field=${key}]`).textContent = t[key];
  }

  function render(entry) {
    const b = entry.data;
    const q = (name) => entry.el.querySelector(`[data-field=${name}]`);
    entry.el.dataset.status = b.status;
    setBadge(q("status"), b.status);
    renderBar(q("bar"), b);
    q("done").textContent = `${fmtInt(finished(b))} / ${fmtInt(b.total_items)}`;
    for (const name of ["succeeded", "failed", "cancelled", "running", "pending"]) {
      const node = q(name);
      if (node) node.textContent = fmtInt(b[name + "_items"]);
    }
    const title = q("title");
    if (title) title.textContent = label(b);
    const created = q("created");
    if (created) created.textContent = b.created_at ? new Date(b.created_at).toLocaleString() : "–";
    const reason = q("reason");
    if (reason) reason.textContent = b.status_reason ? "(" + b.status_reason + ")" : "";
    renderRetryOf(entry);
    renderTiming(entry);
    renderParallel(entry);
    actions.render(entry);
  }

  function renderRetryOf(entry) {
    const box = entry.el.querySelector("[data-field=retryof]");
    if (!box) return;
    const original = entry.data.retry_of;
    box.hidden = !original;
    if (!original) return;
    const link = box.querySelector("a");
    link.href = config.dashboardUrl + original + "/";
    link.textContent = "batch " + original.slice(0, 8);
  }

  function newRow(b) {
    const link = el("a", { href: config.dashboardUrl + b.id + "/", dataset: { field: "title" } });
    const cells = [
      el("th", { scope: "row", class: "bd-name" }, [
        link, el("div", { class: "bd-quiet bd-sub" }, [el("code", { text: b.handler }), " · " + shortId(b)]),
      ]),
      el("td", {}, [el("span", { class: "bd-badge", dataset: { field: "status" } })]),
      el("td", { class: "bd-col-progress" }, [
        el("div", { class: "bd-bar", dataset: { field: "bar" } }),
        el("div", { class: "bd-quiet bd-sub" }, [
          el("span", { dataset: { field: "done" } }), " done · ",
          el("span", { dataset: { field: "failed" } }), " failed · ",
          el("span", { dataset: { field: "running" } }), " running",
        ]),
      ]),
      el("td", { class: "bd-num", dataset: { field: "rate" } }),
      el("td", { class: "bd-num", dataset: { field: "elapsed" } }),
      el("td", { class: "bd-num", dataset: { field: "eta" } }),
      el("td", { class: "bd-parallel", dataset: { field: "parallel" } }),
      el("td", { class: "bd-actions", dataset: { field: "actions" } }),
    ];
    return el("tr", { dataset: { id: b.id }, class: "bd-row" }, cells);
  }

  function isNewer(next, current) {
    if (!current) return true;
    if (TERMINAL.has(current.status) && !TERMINAL.has(next.status)) return false;
    return !next.updated_at || !current.updated_at || Date.parse(next.updated_at) >= Date.parse(current.updated_at);
  }

  // `baseline`: a snapshot (first load or reconnect) sets the counters to compare with, so
  // items that finished while the page was away do not show as one burst of throughput.
  function applyBatch(b, baseline) {
    if (config.batchId && b.id !== config.batchId) return;
    let entry = batches.get(b.id);
    if (entry && !isNewer(b, entry.data)) return;
    if (!entry) {
      const element = config.batchId ? document.querySelector("[data-batch-card]") : newRow(b);
      entry = { data: b, samples: [], el: element, series: new Charts.RateSeries(), lastDone: null };
      batches.set(b.id, entry);
      if (!config.batchId) placeRow(entry);
    }
    entry.data = b;
    countThroughput(entry, baseline);
    for (const [id, seconds] of b.recent_durations || []) addDuration(id, seconds);
    sample(entry);
    render(entry);
    scheduleCharts();
  }

  function countThroughput(entry, baseline) {
    const now = Date.now();
    const done = processed(entry.data);
    entry.series.start(now);
    overall.start(now);
    if (entry.lastDone !== null && !baseline && done > entry.lastDone) {
      entry.series.add(done - entry.lastDone, now);
      overall.add(done - entry.lastDone, now);
    }
    entry.lastDone = done;
  }

  // --- charts ------------------------------------------------------------------------------

  function addDuration(id, seconds) {
    if (!(seconds >= 0)) return;
    durations.delete(id);
    durations.set(id, seconds);
    while (durations.size > MAX_DURATIONS) durations.delete(durations.keys().next().value);
  }

  function itemSeconds(item) {
    if (!item.started_at || !item.finished_at || (item.status !== "succeeded" && item.status !== "failed")) return null;
    return (Date.parse(item.finished_at) - Date.parse(item.started_at)) / 1000;
  }

  function renderCharts() {
    const now = Date.now();
    const overview = document.querySelector("[data-chart=overview-rate]");
    if (overview) {
      const points = Charts.drawRate(overview, overall, now);
      const current = document.querySelector("[data-field=overall-rate]");
      if (current) current.textContent = points.length ? points[points.length - 1][1].toFixed(1) + " items/s" : "–";
    }
    const entry = config.batchId && batches.get(config.batchId);
    const rateBox = document.querySelector("[data-chart=rate]");
    if (entry && rateBox) Charts.drawRate(rateBox, entry.series, now);
    const histogram = document.querySelector("[data-chart=durations]");
    if (histogram) {
      const stats = Charts.drawHistogram(histogram, [...durations.values()]);
      const text = (name, value) => {
        const node = document.querySelector(`[data-field=${name}]`);
        if (node) node.textContent = value;
      };
      text("p50", stats.p50 === null ? "–" : Charts.fmtSeconds(stats.p50));
      text("p95", stats.p95 === null ? "–" : Charts.fmtSeconds(stats.p95));
      text("sampled", fmtInt(stats.n));
    }
  }

  let chartsDirty = false;
  function scheduleCharts() {
    if (chartsDirty) return;
    chartsDirty = true;
    requestAnimationFrame(() => {
      chartsDirty = false;
      renderCharts();
    });
  }

  function placeRow(entry) {
    const tbody = document.querySelector("[data-batches]");
    const empty = tbody.querySelector("[data-empty]");
    if (empty) empty.remove();
    const created = Date.parse(entry.data.created_at);
    const after = [...tbody.children].find((row) => {
      const other = batches.get(row.dataset.id);
      return other && Date.parse(other.data.created_at) < created;
    });
    tbody.insertBefore(entry.el, after || null);
  }

  // --- items (per-batch page) ----------------------------------------------------------------

  const items = new Map(); // id -> item, in arrival order (newest last)

  function itemDetail(item) {
    if (item.error) return el("span", { class: item.status === "failed" ? "bd-error" : "bd-quiet", text: item.error });
    if (item.result === null || item.result === undefined) return el("span", { class: "bd-quiet", text: "–" });
    return el("code", { class: "bd-result-preview", text: JSON.stringify(item.result).slice(0, 160) });
  }

  function itemDuration(item) {
    if (!item.started_at) return "–";
    const end = item.finished_at ? Date.parse(item.finished_at) : Date.now();
    return ((end - Date.parse(item.started_at)) / 1000).toFixed(2) + "s";
  }

  function itemRow(item, columns) {
    const cells = {
      index: el("td", { text: String(item.index) }),
      status: el("td", {}, [el("span", { class: "bd-badge bd-status-" + item.status, text: item.status })]),
      attempts: el("td", { class: "bd-num", text: String(item.attempts) }),
      started: el("td", { text: fmtTime(item.started_at) }),
      finished: el("td", { text: fmtTime(item.finished_at) }),
      duration: el("td", { class: "bd-num", text: itemDuration(item) }),
      detail: el("td", { class: "bd-detail" }, [itemDetail(item)]),
    };
    return el("tr", { dataset: { item: String(item.id), status: item.status } }, columns.map((c) => cells[c]));
  }

  function renderItems() {
    const all = [...items.values()].reverse();
    const recent = all.slice(0, MAX_ITEMS);
    const failures = all.filter((item) => item.status === "failed").slice(0, MAX_ITEMS);
    fillTable("[data-items]", recent, ["index", "status", "attempts", "started", "duration", "detail"]);
    fillTable("[data-failures]", failures, ["index", "attempts", "finished", "detail"]);
    const count = document.querySelector("[data-failure-count]");
    const entry = batches.get(config.batchId);
    if (count && entry) count.textContent = entry.data.failed_items ? "(" + fmtInt(entry.data.failed_items) + ")" : "";
  }

  function fillTable(selector, rows, columns) {
    const tbody = document.querySelector(selector);
    if (!rows.length) return;
    tbody.replaceChildren(...rows.map((item) => itemRow(item, columns)));
  }

  function applyItem(item) {
    const seconds = itemSeconds(item);
    if (seconds !== null) addDuration(item.id, seconds);
    items.delete(item.id);
    items.set(item.id, item);
    while (items.size > MAX_ITEMS * 4) items.delete(items.keys().next().value);
  }

  let itemsDirty = false;
  function scheduleItems() {
    if (itemsDirty) return;
    itemsDirty = true;
    requestAnimationFrame(() => {
      itemsDirty = false;
      renderItems();
    });
  }

  const actions = window.BatchActions.install({
    config, api, applyBatch, label, allowed, problemText, fmtInt, el, TERMINAL,
  });

  // --- socket --------------------------------------------------------------------------------

  function onMessage(message) {
    if (message.type === "snapshot") {
      for (const b of message.batches || []) applyBatch(b, true);
      if (message.batch) applyBatch(message.batch, true);
      for (const item of [...(message.failures || [])].reverse()) applyItem(item);
      for (const item of [...(message.items || [])].reverse()) applyItem(item);
      if (config.batchId) scheduleItems();
    } else if (message.type === "batch.updated") {
      applyBatch(message.batch);
    } else if (message.type === "item.updated" && config.batchId) {
      applyItem(message.item);
      scheduleItems();
      scheduleCharts();
    }
  }

  function setConnection(state, text) {
    const pill = document.querySelector("[data-conn]");
    pill.dataset.state = state;
    pill.textContent = text;
    document.body.classList.toggle("bd-offline", state !== "live");
  }

  function connect(path) {
    let delay = 500;
    let timer = null;
    const open = () => {
      const scheme = location.protocol === "https:" ? "wss://" : "ws://";
      const socket = new WebSocket(scheme + location.host + path);
      socket.onopen = () => {
        delay = 500;
        setConnection("live", "Live");
      };
      socket.onmessage = (event) => {
        try {
          onMessage(JSON.parse(event.data));
        } catch (error) {
          console.error("bad dashboard message", error);
        }
      };
      socket.onclose = (event) => {
        const wait = delay + Math.random() * delay * 0.2;
        const why = event.code === 4403 ? " (not allowed: log in again)" : event.code === 4404 ? " (no such batch)" : "";
        setConnection("offline", `Disconnected${why} — reconnecting in ${Math.ceil(wait / 1000)}s`);
        clearTimeout(timer);
        timer = setTimeout(open, wait);
        delay = Math.min(delay * 2, 15000);
      };
    };
    open();
  }

  // --- submit form -----------------------------------------------------------------------------

  const DEFAULT_PARAMS = { "demo.sleep": '{"seconds": 2}', "demo.noop": "{}", "demo.forecast": '{"store": 1, "product": 1, "horizon": 28}' };

  function readItems(form) {
    const parsed = JSON.parse(form.params.value || "{}");
    if (Array.isArray(parsed)) return parsed;
    const count = Math.max(1, Number(form.count.value) || 1);
    return Array.from({ length: count }, () => parsed);
  }

  async function submitBatch(event) {
    event.preventDefault();
    const form = event.target;
    const out = form.querySelector("[data-submit-result]");
    out.className = "bd-submit-result";
    let body;
    try {
      body = { handler: form.handler.value, items: readItems(form), max_parallel: Number(form.max_parallel.value) };
    } catch (exc) {
      out.classList.add("bd-error");
      out.textContent = "Item parameters are not valid JSON: " + exc.message;
      return;
    }
    if (form.batch_name.value.trim()) body.name = form.batch_name.value.trim();
    out.textContent = "Submitting…";
    const result = await api("POST", config.apiBatches, body);
    if (result.status === 201 && result.data) {
      applyBatch(result.data);
      out.classList.add("bd-ok");
      out.textContent = `Submitted ${fmtInt(result.data.total_items)} items.`;
    } else {
      out.classList.add("bd-error");
      out.textContent = "Not submitted: " + problemText(result);
    }
  }

  const form = document.querySelector("[data-submit-form]");
  if (form) {
    form.addEventListener("submit", submitBatch);
    form.handler.addEventListener("change", () => {
      if (DEFAULT_PARAMS[form.handler.value]) form.params.value = DEFAULT_PARAMS[form.handler.value];
    });
  }

  // --- start -----------------------------------------------------------------------------------

  setInterval(() => {
    for (const entry of batches.values()) {
      if (TERMINAL.has(entry.data.status)) continue;
      sample(entry);
      renderTiming(entry);
    }
    renderCharts(); // the window slides even when nothing arrives
  }, 1000);
  window.addEventListener("resize", scheduleCharts);

  connect(config.batchId ? `${config.wsPath}${config.batchId}/` : config.wsPath);
})();
