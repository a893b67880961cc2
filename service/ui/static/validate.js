// Validate a spec before submitting it: POST /jobs/validate, then show the effective batch of
// each norm layer, the momentum's half-life and the warnings; "Submit job" POSTs the same spec.
"use strict";
(async () => {
  const me = await NC.init("validate");
  if (!me) return;
  const $ = (s) => document.querySelector(s);
  const EXAMPLE = {
    name: "lenet-bn-digits",
    model: { arch: "lenet", norm: "bn" },
    data: { dataset: "digits", batch_size: 32 },
    epochs: 2,
  };
  const draft = sessionStorage.getItem("normcore.validate.spec");
  $("#spec").value = draft || JSON.stringify(EXAMPLE, null, 2);
  let validated = null; // the text last validated without error

  function readSpec() {
    try { return JSON.parse($("#spec").value); }
    catch (e) { throw new NC.ApiError(0, "the spec is not valid JSON: " + e.message); }
  }
  function message(e) {
    // a 422's detail is a list of {loc, msg}: show each as "field: message"
    try {
      const d = JSON.parse(e.message);
      if (Array.isArray(d)) return d.map((x) => `${(x.loc || []).join(".")}: ${x.msg}`).join("\n");
      if (d && d.message) return d.message;
    } catch (_) { /* a plain string */ }
    return e.message;
  }
  const num = (v, digits = 2) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));

  function render(r) {
    $("#warnings").innerHTML = r.warnings.length
      ? r.warnings.map((w) => `<li class="warning" data-code="${NC.esc(w.code)}"><strong>${NC.esc(w.code)}</strong>: ${NC.esc(w.message)}</li>`).join("")
      : '<li class="ok">No warnings.</li>';
    const s = r.running_stats;
    const facts = [
      ["Processes x batch per device", `${r.world_size} x ${r.per_device_batch} = ${r.global_batch} per step`],
      ["BatchNorm statistics", r.sync_bn ? "pooled over all processes (SyncBN)" : "per process"],
      ["Steps per epoch / in the run", `${r.steps_per_epoch} / ${r.total_steps}`],
      ["Parameters", r.parameters.toLocaleString("en")],
      ["Memory estimate", r.memory_mb ? `${r.memory_mb.total_mb} MB` : "not available"],
      ["Momentum", s.momenta.length ? s.momenta.join(", ") : s.cumulative ? "None (cumulative average)" : "-"],
      ["Half-life", s.half_life_steps !== null && s.half_life_steps !== undefined ? `${num(s.half_life_steps)} steps` : "-"],
      ["Half-lives in the run", num(s.half_lives_in_run, 1)],
    ];
    if (s.cumulative_meaning) facts.push(["Cumulative average", s.cumulative_meaning]);
    $("#summary").innerHTML = facts.map(([k, v]) => `<dt>${NC.esc(k)}</dt><dd>${NC.esc(v)}</dd>`).join("");
    $("#layers tbody").innerHTML = r.layers.map((l) => `<tr>
      <td>${NC.esc(l.name)}</td><td>${NC.esc(l.kind)}${l.synced ? " (sync)" : ""}</td>
      <td>${l.map_size ? NC.esc(l.map_size.join("x")) : "-"}</td><td class="num">${l.per_device_batch}</td>
      <td class="num">${l.norm_batch ?? "-"}</td><td class="num">${l.values_per_stat}</td>
      <td class="num">${l.momentum ?? "-"}</td><td class="num">${num(l.half_life_steps)}</td></tr>`).join("");
    $("#notes").innerHTML = r.notes.map((n) => `<li>${NC.esc(n)}</li>`).join("");
    $("#result").hidden = false;
  }

  $("#spec").addEventListener("input", () => {
    sessionStorage.setItem("normcore.validate.spec", $("#spec").value);
    $("#submit").disabled = $("#spec").value !== validated;
  });
  $("#spec-form").onsubmit = async (e) => {
    e.preventDefault();
    $("#error").textContent = ""; $("#state").textContent = "validating...";
    try {
      const text = $("#spec").value;
      const r = await NC.api("/jobs/validate", { method: "POST", json: readSpec() });
      render(r); validated = text; $("#submit").disabled = false;
      $("#state").textContent = r.warnings.length ? `${r.warnings.length} warning(s)` : "valid, no warnings";
    } catch (err) {
      $("#result").hidden = true; $("#submit").disabled = true;
      $("#state").textContent = ""; $("#error").textContent = message(err);
    }
  };
  $("#submit").onclick = async () => {
    $("#error").textContent = "";
    try {
      const job = await NC.api("/jobs", { method: "POST", json: readSpec() });
      location.href = "/ui/jobs/" + encodeURIComponent(job.id);
    } catch (err) { $("#error").textContent = message(err); }
  };
  document.body.dataset.ready = "1"; // the handlers are in place (the tests wait for it)
})();
