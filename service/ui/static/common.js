// Shared by every page: the token (sessionStorage, never in a URL or a cookie), the JSON API
// with a Bearer header, the sign-in form and small helpers.
"use strict";
const NC = (() => {
  const KEY = "normcore.token";
  // Okabe-Ito (colour-blind safe). On a dark background the deep blue is swapped with the sky
  // blue, which reads there (contrast over 3:1 against --bg for every colour of the set).
  const DARK = matchMedia("(prefers-color-scheme: dark)").matches;
  const PALETTE = DARK
    ? ["#56B4E9", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#0072B2", "#F0E442", "#BBBBBB"]
    : ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#999999"];
  const token = () => sessionStorage.getItem(KEY);
  function esc(s) {
    return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  class ApiError extends Error {
    constructor(status, detail) { super(typeof detail === "string" ? detail : JSON.stringify(detail)); this.status = status; }
  }
  async function api(path, opts = {}) {
    const headers = Object.assign({ Accept: "application/json" }, opts.headers || {});
    if (token()) headers.Authorization = "Bearer " + token();
    if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(opts.json); }
    const r = await fetch(path, { method: opts.method || "GET", headers, body: opts.body });
    if (r.status === 401) { if (!opts.probe) signOut(); throw new ApiError(401, "sign in again"); }
    if (r.status === 204) return null;
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new ApiError(r.status, body && body.detail !== undefined ? body.detail : r.statusText);
    return body;
  }
  // Server-sent events over fetch (EventSource cannot send an Authorization header).
  async function events(path, onEvent, signal) {
    const r = await fetch(path, { headers: { Authorization: "Bearer " + token(), Accept: "text/event-stream" }, signal });
    if (!r.ok) throw new ApiError(r.status, r.statusText);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i); buf = buf.slice(i + 2);
        let ev = "message", data = [], id = null;
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const k = line.indexOf(":"); const f = k < 0 ? line : line.slice(0, k);
          const v = k < 0 ? "" : line.slice(k + 1).replace(/^ /, "");
          if (f === "event") ev = v; else if (f === "data") data.push(v); else if (f === "id") id = v;
        }
        if (data.length) onEvent(ev, JSON.parse(data.join("\n")), id);
      }
    }
  }
  function signOut() { sessionStorage.removeItem(KEY); location.href = "/ui/"; }
  // Renders the header; when no token is held, a sign-in form instead of the page. Returns the
  // signed-in user's whoami info ({admin}) or null.
  async function init(active) {
    const header = document.createElement("header");
    header.innerHTML = `<span class="brand">normcore</span><nav aria-label="Main">
      <a href="/ui/" ${active === "jobs" ? 'aria-current="page"' : ""}>Jobs</a>
      <a href="/ui/sweeps" id="nav-sweeps" ${active === "sweeps" ? 'aria-current="page"' : ""}>Sweeps</a>
      <a href="/ui/validate" id="nav-validate" ${active === "validate" ? 'aria-current="page"' : ""}>Validate</a>
      <a href="/ui/workers" id="nav-workers" hidden ${active === "workers" ? 'aria-current="page"' : ""}>Workers</a>
      <a href="/docs">API docs</a></nav>
      <button type="button" id="signout" hidden>Sign out</button>`;
    document.body.prepend(header);
    header.querySelector("#signout").onclick = signOut;
    const main = document.querySelector("main");
    if (!token()) {
      main.hidden = true;
      const form = document.createElement("form");
      form.className = "signin card"; form.id = "signin";
      form.innerHTML = `<h1>Sign in</h1><label for="token">API token</label>
        <input id="token" type="password" autocomplete="current-password" required autofocus>
        <p class="muted">The token stays in this tab (sessionStorage) and is sent only to this server.
        Create one with <code>normcore token create NAME</code>.</p>
        <button type="submit">Sign in</button><p class="error" role="alert" id="signin-error"></p>`;
      document.body.append(form);
      form.onsubmit = async (e) => {
        e.preventDefault();
        sessionStorage.setItem(KEY, form.querySelector("#token").value.trim());
        try { await api("/jobs?limit=1", { probe: true }); location.reload(); }
        catch (err) { sessionStorage.removeItem(KEY); form.querySelector("#signin-error").textContent = "Token refused: " + err.message; }
      };
      return null;
    }
    header.querySelector("#signout").hidden = false;
    let admin = false;
    try { await api("/workers"); admin = true; } catch (e) { admin = false; }
    header.querySelector("#nav-workers").hidden = !admin;
    return { admin };
  }
  function age(iso) {
    if (!iso) return "";
    const s = (Date.now() - new Date(iso).getTime()) / 1000;
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }
  const fmt = (v) => (v === null || v === undefined ? "" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v));
  const statusBadge = (s) => `<span class="status status-${esc(s)}">${esc(s)}</span>`;
  return { api, events, init, esc, age, fmt, statusBadge, PALETTE, ApiError };
})();
