"use strict";
// The operator's power dashboard. One GET of /dashboard/api/state (with history), then the
// event stream, read with fetch because EventSource cannot send an Authorization header.
(function () {
  const KEY_NAME = "factory_admin_key"; // sessionStorage only: the key dies with the tab
  const WINDOW_S = 900; // 15 minutes of history...
  const MAX_POINTS = 900; // ...at about one point a second
  const RECONNECT_MS = 2000;
  const STALL_MS = 10000; // a connection silent this long is dead even if the socket is not
  const MODELED_TIP = "estimated from the engine's busy time, not measured";
  // Okabe-Ito: tells lines apart for colour-blind readers too.
  const PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000"];
  // The governor's order of escalation (DESIGN.md): batch caps, then admission, then shedding.
  const THROTTLE_NAMES = ["none", "capped", "low slowed", "low shed"];
  // Taken from the page's own charts, so the script spells out no URL at all.
  const SVG_NS = document.querySelector("svg").namespaceURI;

  const $ = (id) => document.getElementById(id);
  let hist = null; // {site: {t, power_w, tokens_per_s, tokens_per_joule}, replicas: {id: {t, power_w, tokens_per_s}}}
  let lastState = null;
  let updates = 0;
  let stream = null; // AbortController of the connection in progress; null when stopped
  let retryTimer = null;
  let lastEventMs = 0;
  let tenantSort = { key: "completion_tokens", dir: -1 };
  const colours = new Map();

  // -- small helpers ----------------------------------------------------------------------------

  function num(x) {
    const n = typeof x === "string" && x.trim() !== "" ? Number(x) : x;
    return typeof n === "number" && Number.isFinite(n) ? n : null;
  }

  function el(tag, attrs, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v != null) node.setAttribute(k, v);
    for (const kid of kids) if (kid != null) node.append(kid);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text != null) node.textContent = text;
    return node;
  }

  function colourOf(id) {
    if (!colours.has(id)) colours.set(id, PALETTE[colours.size % PALETTE.length]);
    return colours.get(id);
  }

  const fixed = (x, digits, unit) => (x === null ? "—" : x.toFixed(digits) + (unit ? " " + unit : ""));

  function fmtW(w) {
    const x = num(w);
    if (x === null) return "—";
    if (Math.abs(x) >= 10000) return (x / 1000).toFixed(1) + " kW";
    return x.toFixed(Math.abs(x) >= 100 ? 0 : 1) + " W";
  }

  function fmtJ(j) {
    const x = num(j);
    if (x === null) return "—";
    const units = [[1e9, "GJ"], [1e6, "MJ"], [1e3, "kJ"]];
    for (const [size, unit] of units) if (Math.abs(x) >= size) return (x / size).toFixed(2) + " " + unit;
    return x.toFixed(1) + " J";
  }

  // Costs per request are tiny: keep three significant digits instead of rounding to 0.00.
  function fmtMoney(amount, currency) {
    const x = num(amount);
    if (x === null) return "—";
    const places = x === 0 || Math.abs(x) >= 1 ? 2 : Math.min(12, 2 - Math.floor(Math.log10(Math.abs(x))));
    return x.toFixed(places) + (currency ? " " + currency : "");
  }

  const fmtInt = (n) => (num(n) === null ? "—" : Math.round(num(n)).toLocaleString("en-US"));
  const clock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false });

  // -- history ----------------------------------------------------------------------------------

  const list = (a) => (Array.isArray(a) ? a.slice() : []);
  const tail = (a, n) => (n > 0 ? a.slice(-n) : []);

  function historyFrom(h) {
    h = h || {};
    const site = aligned({ t: list(h.t), power_w: list(h.site_power_w), tokens_per_s: list(h.site_tokens_per_s),
      tokens_per_joule: list(h.site_tokens_per_joule) });
    const replicas = {};
    for (const [id, r] of Object.entries(h.replicas || {})) {
      // Replica series carry no times of their own in the contract: they end when the site's does.
      replicas[id] = aligned({ t: list(Array.isArray(r.t) ? r.t : site.t), power_w: list(r.power_w),
        tokens_per_s: list(r.tokens_per_s) });
    }
    return { site, replicas };
  }

  // Cuts every array of a series to the common length, keeping the newest points.
  function aligned(series) {
    const n = Math.min(...Object.values(series).map((a) => a.length));
    for (const k of Object.keys(series)) series[k] = tail(series[k], n);
    return series;
  }

  function push(series, t, point) {
    const n = series.t.length;
    if (n && t <= series.t[n - 1]) return; // already have it (the state fetch and the stream overlap)
    series.t.push(t);
    for (const [k, v] of Object.entries(point)) series[k].push(num(v));
  }

  function trim(series, now) {
    while (series.t.length > MAX_POINTS || series.t[0] < now - WINDOW_S) {
      for (const k of Object.keys(series)) series[k].shift();
    }
  }

  function appendPoint(state) {
    const t = num(state.time);
    if (!hist || t === null) return;
    const site = state.site || {};
    push(hist.site, t, { power_w: site.power_w, tokens_per_s: site.tokens_per_s, tokens_per_joule: site.tokens_per_joule });
    for (const r of state.replicas || []) {
      const h = hist.replicas[r.id] || (hist.replicas[r.id] = { t: [], power_w: [], tokens_per_s: [] });
      push(h, t, { power_w: r.up ? r.power_w : null, tokens_per_s: r.up ? r.tokens_per_s : null });
    }
    trim(hist.site, t);
    for (const [id, h] of Object.entries(hist.replicas)) {
      trim(h, t);
      if (!h.t.length) delete hist.replicas[id]; // a replica gone for 15 minutes
    }
  }

  // -- the chart --------------------------------------------------------------------------------

  // The smallest of 1, 2, 5 x 10^k that is at least `raw`: at most three intervals, four ticks.
  function niceStep(raw) {
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    return [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw * (1 - 1e-9));
  }

  // series: [{name, values, times, colour, dashed}]; opts: {yUnit, yMin, height, budgets: [{value, colour, label}]}.
  // The viewBox takes the element's current width, so text stays at its size on a phone; the chart
  // is redrawn on every update and scales with the viewBox in between.
  function lineChart(svgEl, series, opts) {
    opts = opts || {};
    const W = Math.max(240, Math.round(svgEl.getBoundingClientRect().width) || 600);
    const H = opts.height || 160;
    const m = { l: 70, r: 12, t: 10, b: 22 };
    svgEl.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svgEl.replaceChildren();
    const budgets = (opts.budgets || []).filter((b) => num(b.value) !== null);
    const yMin = opts.yMin == null ? 0 : opts.yMin;
    let tMin = Infinity, tMax = -Infinity, yMax = yMin;
    for (const s of series) {
      s.times.forEach((t, i) => {
        const v = num(s.values[i]);
        if (v === null || num(t) === null) return;
        tMin = Math.min(tMin, t); tMax = Math.max(tMax, t); yMax = Math.max(yMax, v);
      });
    }
    for (const b of budgets) yMax = Math.max(yMax, b.value);
    const empty = tMin === Infinity;
    if (empty) { tMax = Date.now() / 1000; tMin = tMax - 60; }
    if (tMax - tMin < 1) tMin = tMax - 1;
    const span = (yMax > yMin ? yMax - yMin : 1) * 1.05; // headroom above the highest point
    const step = niceStep(span / 3);
    const ticks = Math.ceil(span / step);
    const yTop = yMin + ticks * step;
    const x = (t) => m.l + ((t - tMin) / (tMax - tMin)) * (W - m.l - m.r);
    const y = (v) => H - m.b - ((v - yMin) / (yTop - yMin)) * (H - m.t - m.b);
    const digits = Math.max(0, -Math.floor(Math.log10(step)));

    for (let i = 0; i <= ticks; i++) {
      const v = yMin + i * step;
      svgEl.append(svg("line", { x1: m.l, x2: W - m.r, y1: y(v), y2: y(v), class: "grid-line" }));
      svgEl.append(svg("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" },
        `${v.toFixed(digits)} ${opts.yUnit || ""}`));
    }
    [[tMin, "start"], [(tMin + tMax) / 2, "middle"], [tMax, "end"]].forEach(([t, anchor]) => {
      svgEl.append(svg("text", { x: x(t), y: H - 6, "text-anchor": anchor, class: "tick" }, clock(t)));
    });
    svgEl.append(svg("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }));
    svgEl.append(svg("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }));
    if (empty) {
      svgEl.append(svg("text", { x: (m.l + W) / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "No data yet"));
    }

    for (const b of budgets) {
      const line = svg("line", { x1: m.l, x2: W - m.r, y1: y(b.value), y2: y(b.value), stroke: b.colour || "#b00020",
        "stroke-dasharray": "6 4", class: "budget" });
      line.append(svg("title", {}, b.label || "budget"));
      svgEl.append(line);
    }
    for (const s of series) {
      let d = "", pen = "M";
      s.times.forEach((t, i) => {
        const v = num(s.values[i]);
        if (v === null || num(t) === null) { pen = "M"; return; } // a gap, not a drop to zero
        d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
        pen = "L";
      });
      if (!d) continue;
      const path = svg("path", { d, stroke: s.colour || "#222", class: "series" });
      if (s.dashed) path.setAttribute("stroke-dasharray", "6 4");
      path.append(svg("title", {}, s.name || ""));
      svgEl.append(path);
    }
  }

  // -- panels -----------------------------------------------------------------------------------

  // A "modeled" badge and footnote wherever a figure comes from a model rather than a sensor.
  function badge(source) {
    const b = el("span", { class: "badge" });
    const text = { modeled: "modeled*", mixed: "partly modeled*", none: "no telemetry" }[source];
    b.hidden = !text;
    b.textContent = text || "";
    b.title = source === "none" ? "no power readings" : MODELED_TIP;
    return b;
  }

  function markSource(scope, source) {
    for (const b of document.querySelectorAll(`[data-source="${scope}"]`)) {
      const fresh = badge(source);
      b.hidden = fresh.hidden; b.textContent = fresh.textContent; b.title = fresh.title;
    }
    for (const n of document.querySelectorAll(`[data-note="${scope}"]`)) n.hidden = !["modeled", "mixed"].includes(source);
  }

  function renderSite(state) {
    const site = state.site || {};
    const power = num(site.power_w), budget = num(site.budget_w);
    $("site-power").textContent = fmtW(power);
    $("site-budget").textContent = budget === null ? "(no site budget set)" : "of " + fmtW(budget);
    const pct = budget && power !== null ? (power / budget) * 100 : null;
    const bar = $("site-bar"), meter = bar.parentElement;
    meter.hidden = pct === null;
    bar.style.width = Math.min(100, pct || 0) + "%";
    meter.classList.toggle("amber", pct !== null && pct >= 90 && pct <= 100);
    meter.classList.toggle("red", pct !== null && pct > 100);
    meter.setAttribute("aria-valuenow", pct === null ? "0" : pct.toFixed(0));
    $("site-pct").textContent = pct === null ? "" : pct.toFixed(0) + " % of budget.";
    $("site-energy").textContent = fmtJ(site.energy_j);
    markSource("site", site.source);
    lineChart($("chart-site-power"), [{ name: "site power", times: hist.site.t, values: hist.site.power_w, colour: "#1a1a1a" }],
      { yUnit: "W", budgets: budget === null ? [] : [{ value: budget, colour: "#b00020", label: "site budget " + fmtW(budget) }] });
  }

  function renderRates(state) {
    const site = state.site || {};
    $("tokens-per-s").textContent = fixed(num(site.tokens_per_s), 1, "tok/s");
    $("tokens-per-joule").textContent = fixed(num(site.tokens_per_joule), 2, "tok/J");
    const cost = num(site.cost_per_mtok);
    $("cost-per-mtok").textContent = cost === null ? "—" : fmtMoney(cost, state.currency);
    $("cost-per-mtok").title = cost === null ? "no price or no tokens yet" : `${site.cost_per_mtok} ${state.currency || ""}`;
    const small = { height: 120 };
    lineChart($("chart-tokens-per-s"), [{ name: "tokens/s", times: hist.site.t, values: hist.site.tokens_per_s, colour: "#0072b2" }],
      { ...small, yUnit: "tok/s" });
    lineChart($("chart-tokens-per-joule"), [{ name: "tokens/J", times: hist.site.t, values: hist.site.tokens_per_joule, colour: "#009e73" }],
      { ...small, yUnit: "tok/J" });
  }

  function fillBody(table, rows, emptyText) {
    const body = table.tBodies[0];
    const cols = table.tHead.rows[0].cells.length;
    body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: cols, class: "none" }, emptyText))]));
  }

  function meterCell(fraction) {
    const f = num(fraction);
    const pct = f === null ? null : Math.max(0, Math.min(100, f * 100));
    const fill = el("span", { class: "mini-fill" });
    fill.style.width = (pct || 0) + "%";
    return el("td", { class: "kv" }, el("span", { class: "mini" }, fill), " " + (pct === null ? "—" : pct.toFixed(0) + " %"));
  }

  function replicaName(r) {
    return el("td", {}, el("span", { class: "swatch", style: `background:${colourOf(r.id)}` }), r.id,
      r.up === false ? el("span", { class: "down" }, " down") : null);
  }

  function renderReplicas(state) {
    const replicas = state.replicas || [];
    const ids = new Set([...Object.keys(hist.replicas), ...replicas.map((r) => r.id)]);
    const series = [...ids].map((id) => {
      const h = hist.replicas[id] || { t: [], power_w: [] };
      return { name: id, times: h.t, values: h.power_w, colour: colourOf(id) };
    });
    const budgets = replicas.filter((r) => num(r.budget_w) !== null)
      .map((r) => ({ value: num(r.budget_w), colour: colourOf(r.id), label: `budget ${r.id}: ${fmtW(r.budget_w)}` }));
    lineChart($("chart-replica-power"), series, { yUnit: "W", height: 220, budgets });

    $("replica-power").replaceChildren(...(replicas.length ? replicas.map((r) => {
      const devices = (r.devices || []).map((d) => `${d.device} ${fmtW(d.power_w)}` +
        (num(d.power_limit_w) === null ? "" : ` (limit ${fmtW(d.power_limit_w)})`)).join(", ");
      return el("li", { "data-replica": r.id },
        el("span", { class: "swatch", style: `background:${colourOf(r.id)}` }),
        el("strong", {}, r.id), ` ${r.model || ""} `,
        el("span", { class: "now" }, r.up === false ? "down" : fmtW(r.power_w)),
        num(r.budget_w) === null ? " (no budget)" : ` of ${fmtW(r.budget_w)} budget`, " ", badge(r.source),
        devices ? el("span", { class: "devices" }, devices) : null);
    }) : [el("li", { class: "none" }, "No replicas")]));
    const modeled = replicas.some((r) => r.source === "modeled" || r.source === "mixed");
    document.querySelector('[data-note="replicas"]').hidden = !modeled;

    fillBody($("throttle-table"), replicas.map((r) => {
      const t = r.throttle || {};
      const level = num(t.level);
      return el("tr", { "data-replica": r.id }, replicaName(r),
        el("td", {}, el("span", { class: `level level-${level === null ? "x" : level}`, title: "level 0 to 3" },
          level === null ? "—" : `${level} · ${THROTTLE_NAMES[level] || "unknown"}`)),
        el("td", { class: "num" }, num(r.cap_w) === null ? "none" : fmtW(r.cap_w)),
        el("td", { class: "reason" }, t.reason || ""));
    }), "No replicas");
    const adm = state.admission || {};
    const who = [...(adm.shed || []).map((c) => `${c} shed (503)`), ...(adm.slowed || []).map((c) => `${c} slowed`)];
    $("admission").textContent = "Admission: " + (who.length ? `${who.join(", ")} (${adm.reason})` : "every priority class admitted");

    fillBody($("batch-table"), replicas.map((r) => el("tr", { "data-replica": r.id }, replicaName(r),
      el("td", { class: "num" }, `${fmtInt(r.running)} / ${fmtInt(r.max_num_seqs)}`),
      el("td", { class: "num" }, fmtInt(r.waiting)),
      meterCell(r.kv_cache_usage))), "No replicas");
  }

  function renderNodes(state) {
    const nodes = state.nodes || [];
    fillBody($("node-table"), nodes.map((n) => {
      const over = num(n.budget_w) !== null && num(n.power_w) > num(n.budget_w);
      return el("tr", { "data-node": n.node },
        el("td", { title: `${n.node}: ${(n.replicas || []).join(", ")}` }, String(n.node).slice(0, 12)),
        el("td", { class: "num" }, `${fmtInt(n.up)} / ${fmtInt((n.replicas || []).length)}`),
        el("td", { class: over ? "num over" : "num" }, fmtW(n.power_w)),
        el("td", { class: "num" }, num(n.budget_w) === null ? "none" : fmtW(n.budget_w)),
        el("td", { class: "num" }, fixed(num(n.tokens_per_s), 1)));
    }), "No nodes reported yet");
  }

  function renderTenants() {
    const { key, dir } = tenantSort;
    const tenants = ((lastState && lastState.tenants) || []).slice().sort((a, b) => {
      if (key === "tenant") return dir * String(a.tenant).localeCompare(String(b.tenant));
      const x = num(a[key]), y = num(b[key]);
      if (x === null || y === null) return (x === null) - (y === null); // unknowns last, either way
      return dir * (x - y);
    });
    const currency = lastState && lastState.currency;
    fillBody($("tenant-table"), tenants.map((t) => el("tr", { "data-tenant": t.tenant },
      el("td", {}, String(t.tenant)),
      el("td", { class: "num" }, fmtInt(t.requests)),
      el("td", { class: "num" }, fmtInt(t.prompt_tokens)),
      el("td", { class: "num" }, fmtInt(t.completion_tokens)),
      el("td", { class: "num", title: `${fixed(num(t.energy_j), 1)} J` }, fmtJ(t.energy_j)),
      el("td", { class: "num", title: t.cost == null ? "no price" : `${t.cost} ${t.currency || currency || ""}` },
        fmtMoney(t.cost, t.currency || currency)))), "No tenants yet");
    for (const th of $("tenant-table").tHead.rows[0].cells) {
      th.setAttribute("aria-sort", th.dataset.key === key ? (dir > 0 ? "ascending" : "descending") : "none");
    }
  }

  function renderAlarms(state) {
    const alarms = state.alarms || [];
    $("alarms").replaceChildren(...(alarms.length ? alarms.map((a) => {
      const severity = a.severity === "critical" ? "critical" : "warning";
      return el("li", { class: severity, "data-kind": a.kind },
        el("strong", {}, severity), " ", el("span", { class: "kind" }, a.kind || ""), el("p", {}, a.message || ""));
    }) : [el("li", { class: "none" }, "No alarms")]));
  }

  function apply(state) {
    lastState = state;
    updates += 1;
    document.body.dataset.updates = String(updates);
    const t = num(state.time);
    $("updated").textContent = t === null ? "—" : clock(t);
    if (t !== null) $("updated").setAttribute("datetime", new Date(t * 1000).toISOString());
    renderSite(state);
    renderRates(state);
    renderReplicas(state);
    renderNodes(state);
    renderTenants();
    renderAlarms(state);
  }

  // -- connection and sign-in -------------------------------------------------------------------

  class AuthError extends Error {}

  function authHeaders() {
    const key = sessionStorage.getItem(KEY_NAME);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  async function checked(resp) {
    if (resp.ok) return resp;
    let message = `HTTP ${resp.status}`;
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) message = String(body.error.message);
    } catch (_) { /* not JSON: the status says enough */ }
    throw resp.status === 401 || resp.status === 403 ? new AuthError(message) : new Error(message);
  }

  function setConn(state) {
    const conn = $("conn");
    conn.textContent = { live: "● live", reconnecting: "reconnecting…", "signed-out": "signed out" }[state];
    conn.className = "conn " + state;
  }

  async function readStream(signal) {
    const resp = await checked(await fetch("/dashboard/api/stream", { headers: authHeaders(), cache: "no-store", signal }));
    if (!resp.body) throw new Error("the stream has no body");
    setConn("live");
    lastEventMs = Date.now();
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) {
        lastEventMs = Date.now(); // comments count as keep-alives
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        const state = JSON.parse(data); // a broken event breaks the stream: reconnect, don't guess
        appendPoint(state);
        apply(state);
      }
    }
  }

  async function connect() {
    clearTimeout(retryTimer);
    const ctl = new AbortController();
    stream = ctl;
    lastEventMs = Date.now();
    try {
      if (!sessionStorage.getItem(KEY_NAME)) {
        // Ask first (public, always 200) so that a keyless visit is not a 401 in the console.
        const auth = await (await fetch("/dashboard/api/auth", { cache: "no-store", signal: ctl.signal })).json();
        if (auth.auth_required) return showLogin("");
      }
      const resp = await checked(await fetch("/dashboard/api/state", { headers: authHeaders(), cache: "no-store", signal: ctl.signal }));
      const state = await resp.json();
      showPanels();
      hist = historyFrom(state.history);
      appendPoint(state);
      apply(state);
      await readStream(ctl.signal);
    } catch (err) {
      if (stream !== ctl) return; // stopped on purpose (sign-out, stall)
      if (err instanceof AuthError) return showLogin(err.message);
      console.warn("dashboard: connection lost:", err.message);
    }
    if (stream === ctl) reconnectLater();
  }

  function reconnectLater() {
    stream = null;
    setConn("reconnecting");
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, RECONNECT_MS);
  }

  function stop() {
    const ctl = stream;
    stream = null;
    clearTimeout(retryTimer);
    if (ctl) ctl.abort();
  }

  function showPanels() {
    $("login").hidden = true;
    $("panels").hidden = false;
    $("sign-in").disabled = false;
    $("sign-out").hidden = !sessionStorage.getItem(KEY_NAME);
  }

  function showLogin(message) {
    stop();
    const triedKey = sessionStorage.getItem(KEY_NAME) !== null;
    sessionStorage.removeItem(KEY_NAME); // a rejected key is no use for the retries
    setConn("signed-out");
    $("panels").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    $("sign-in").disabled = false;
    $("login-error").textContent = triedKey ? message : "";
    $("login-error").hidden = !triedKey;
    $("admin-key").focus();
  }

  function init() {
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("admin-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_NAME, key);
      $("admin-key").value = "";
      $("sign-in").disabled = true;
      stop();
      connect();
    });
    $("sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_NAME);
      stop();
      connect(); // without a key: the login form if keys are required, the data if not
    });
    for (const th of $("tenant-table").tHead.rows[0].cells) {
      th.addEventListener("click", () => {
        const key = th.dataset.key;
        // Text sorts A→Z first, numbers biggest first; a second click reverses.
        tenantSort = tenantSort.key === key ? { key, dir: -tenantSort.dir } : { key, dir: th.dataset.type === "text" ? 1 : -1 };
        renderTenants();
      });
    }
    setInterval(() => {
      if (stream && Date.now() - lastEventMs > STALL_MS) {
        stop();
        reconnectLater();
      }
    }, 1000);
    connect();
  }

  init();
})();
