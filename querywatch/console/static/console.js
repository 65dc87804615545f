// querywatch console. Plain JS, no dependencies. Every value from the server is put into the
// page as text (textContent / text nodes), never as markup: SQL, paths and ids are untrusted.
"use strict";

(() => {
  const POLL_MS = 1500;
  const MAX_ROWS = 500;
  const LABELS = {
    n_plus_one: "N+1",
    duplicate_query: "duplicate",
    bulk_write: "bulk write",
    lazy_load_after_close: "lazy load after close",
    connection_leak: "connection leak",
    stale_allowlist_entry: "stale allowlist entry",
  };
  const state = {
    latest: 0,
    units: [],
    timer: null,
    generation: 0,
    routes: [],
    sort: { key: "db_ms_total", dir: -1 },
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // Only URLs of an editor's own scheme become links: never javascript:, data: and the like.
  function safeEditorUrl(url) {
    if (typeof url !== "string") return null;
    const match = /^([a-z][a-z0-9+.-]*):/i.exec(url);
    if (!match) return null;
    const scheme = match[1].toLowerCase();
    if (["javascript", "data", "vbscript", "file", "blob"].includes(scheme)) return null;
    return url;
  }

  function callsite(text, url) {
    if (!text) return el("span", "site muted", "unknown call site");
    const safe = safeEditorUrl(url);
    if (!safe) return el("code", "site", text);
    const link = el("a", "site mono", text);
    link.setAttribute("href", safe);
    link.title = "Open in your editor";
    return link;
  }

  function kindClass(kind) {
    return "kind-" + String(kind).replace(/[^a-z_]/g, "");
  }

  function badge(kind, count) {
    const label = LABELS[kind] || String(kind);
    return el("span", "badge " + kindClass(kind), count > 1 ? `${label} \u00d7${count}` : label);
  }

  function ms(value) {
    if (value === null || value === undefined) return "";
    return value >= 100 ? `${Math.round(value)} ms` : `${value.toFixed(1)} ms`;
  }

  function time(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
  }

  async function api(path, options) {
    const response = await fetch(path, {
      credentials: "same-origin",
      headers: { Accept: "application/json", "X-Querywatch-Console": "1" },
      ...options,
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  function setLive(text, className) {
    const live = $("live");
    live.textContent = text;
    live.className = "live " + (className || "");
  }

  // --- list view ---------------------------------------------------------------------------

  function filters() {
    const params = new URLSearchParams();
    const route = $("f-route").value.trim();
    if (route) params.set("route", route);
    if ($("f-kind").value) params.set("kind", $("f-kind").value);
    if ($("f-finding").value) params.set("finding", $("f-finding").value);
    if ($("f-findings").checked) params.set("findings", "1");
    const slower = Number($("f-slower").value);
    if (slower > 0) params.set("slower_ms", String(slower));
    return params;
  }

  function unitRow(unit, fresh) {
    const row = el("tr", fresh ? "new" : "");
    row.dataset.id = String(unit.id);
    const link = el("a", "route", unit.route || unit.name);
    link.setAttribute("href", `#/units/${encodeURIComponent(unit.id)}`);
    const where = el("td", "", link);
    if (unit.path && unit.path !== unit.route) where.append(el("div", "path", unit.path));
    if (unit.kind !== "request") where.append(el("div", "path", unit.kind));
    let status = "";
    if (unit.status !== null && unit.status !== undefined) {
      status = el("span", unit.status >= 400 ? "status-bad" : "status-ok", unit.status);
    }
    const findings = el("td", "");
    for (const [kind, count] of Object.entries(unit.findings)) findings.append(badge(kind, count));
    row.append(
      el("td", "mono", time(unit.ended)),
      el("td", "opt", unit.method || ""),
      where,
      el("td", "", status),
      el("td", "num", ms(unit.duration_ms)),
      el("td", "num opt", ms(unit.db_ms)),
      el("td", "num", unit.statements),
      findings,
      el("td", "num opt", ms(unit.pool_wait_ms)),
    );
    row.addEventListener("click", (event) => {
      if (event.target instanceof HTMLAnchorElement) return;
      location.hash = `#/units/${encodeURIComponent(unit.id)}`;
    });
    return row;
  }

  function renderUnits(fresh) {
    const body = $("units-body");
    const rows = [];
    for (const unit of state.units) rows.push(unitRow(unit, fresh.has(unit.id)));
    body.replaceChildren(...rows);
    $("units-empty").hidden = state.units.length > 0;
  }

  async function poll() {
    const generation = state.generation;
    const params = filters();
    params.set("after", String(state.latest));
    try {
      const data = await api(`api/units?${params}`);
      if (generation !== state.generation) return; // the filters changed meanwhile
      const fresh = new Set(state.latest ? data.units.map((u) => u.id) : []);
      state.units = data.units.concat(state.units).slice(0, MAX_ROWS);
      state.latest = Math.max(state.latest, data.latest);
      if (data.units.length || !state.units.length) renderUnits(fresh);
      setLive($("f-pause").checked ? "paused" : "live", $("f-pause").checked ? "paused" : "");
    } catch (error) {
      setLive(`offline: ${error.message}`, "error");
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = null;
    if (currentView() !== "units" || $("f-pause").checked) {
      if ($("f-pause").checked) setLive("paused", "paused");
      return;
    }
    state.timer = setTimeout(async () => {
      if (!document.hidden) await poll();
      schedule();
    }, POLL_MS);
  }

  async function reloadUnits() {
    state.generation += 1;
    state.latest = 0;
    state.units = [];
    await poll();
    schedule();
  }

  // --- unit view ---------------------------------------------------------------------------

  function facts(pairs) {
    const list = el("dl", "facts");
    for (const [name, value] of pairs) {
      if (value === null || value === undefined || value === "") continue;
      list.append(el("div", "", el("dt", "", name), el("dd", "", value)));
    }
    return list;
  }

  function findingCard(finding) {
    const card = el("article", "finding " + kindClass(finding.kind));
    card.append(el("p", "", badge(finding.kind, 1), " ", el("strong", "", finding.headline)));
    card.append(el("p", "", "at ", callsite(finding.callsite, finding.editor_url)));
    if (finding.fix) card.append(el("p", "fix", el("strong", "", "Fix: "), finding.fix));
    if (finding.parameters && finding.parameters.length) {
      const list = el("ul", "mono");
      for (const example of finding.parameters) list.append(el("li", "", example));
      card.append(el("p", "", "Parameters (examples):"), list);
    }
    return card;
  }

  async function explain(unitId, group, cell, button) {
    button.disabled = true;
    const out = el("div", "plan", "running EXPLAIN\u2026");
    cell.append(out);
    try {
      const plan = await api(
        `api/units/${encodeURIComponent(unitId)}/groups/${encodeURIComponent(group)}/explain`,
        { method: "POST" },
      );
      const table = el("table", "");
      const head = el("tr", "");
      for (const column of plan.columns) head.append(el("th", "", column));
      table.append(head);
      for (const row of plan.rows) {
        const tr = el("tr", "");
        for (const value of row) tr.append(el("td", "mono", value));
        table.append(tr);
      }
      out.replaceChildren(el("div", "hint", `${plan.dialect}: ${plan.note}`), table);
    } catch (error) {
      out.replaceChildren(el("span", "error", error.message));
      button.disabled = false;
    }
  }

  function statementsTable(unit) {
    const table = el("table", "grid statements");
    table.append(
      el(
        "thead",
        "",
        el(
          "tr",
          "",
          el("th", "num", "#"),
          el("th", "", "Statement shape"),
          el("th", "num", "Runs"),
          el("th", "num", "Time"),
          el("th", "", "Call site"),
        ),
      ),
    );
    const body = el("tbody", "");
    for (const group of unit.groups) {
      const row = el("tr", group.finding ? "tag-" + kindClass(group.finding).slice(5) : "");
      const shape = el("td", "shape", el("pre", "", group.fingerprint));
      if (group.finding) shape.prepend(badge(group.finding, 1));
      if (group.explain) {
        const button = el("button", "", "EXPLAIN");
        button.type = "button";
        button.addEventListener("click", () => explain(unit.id, group.group, shape, button));
        shape.append(button);
      }
      row.append(
        el("td", "num", group.first + 1),
        shape,
        el("td", "num count", group.count > 1 ? `\u00d7${group.count}` : "1"),
        el("td", "num", ms(group.ms)),
        el("td", "", callsite(group.callsite, group.editor_url)),
      );
      body.append(row);
    }
    table.append(body);
    return table;
  }

  function executionOrder(unit) {
    const details = el("details", "");
    details.append(el("summary", "", `All ${unit.statement_list.length} statements in execution order`));
    const list = el("ol", "order");
    for (const statement of unit.statement_list) {
      const group = unit.groups[statement.group];
      list.append(
        el(
          "li",
          "",
          el("span", "mono", ms(statement.ms)),
          " \u2014 ",
          el("code", "", group.fingerprint.slice(0, 160)),
          " \u2014 ",
          callsite(group.callsite, group.editor_url),
        ),
      );
    }
    details.append(list);
    return details;
  }

  async function showUnit(id) {
    const target = $("unit");
    target.replaceChildren(el("p", "hint", "loading\u2026"));
    let unit;
    try {
      unit = await api(`api/units/${encodeURIComponent(id)}`);
    } catch (error) {
      target.replaceChildren(el("p", "error", `Unit ${id}: ${error.message} (it may have left the buffer).`));
      return;
    }
    const title = unit.method ? `${unit.method} ${unit.route}` : unit.name;
    const parts = [el("h1", "", title)];
    parts.push(
      facts([
        ["Path", unit.path],
        ["Status", unit.status],
        ["Kind", unit.kind],
        ["Ended", unit.ended],
        ["Duration", ms(unit.duration_ms)],
        ["DB time", ms(unit.db_ms)],
        ["Statements", unit.statements],
        ["Failed", unit.failed_statements || null],
        ["Error", unit.error],
        ["Request id", unit.request_id],
      ]),
    );
    parts.push(el("h2", "", `Findings (${unit.finding_list.length})`));
    if (unit.finding_list.length) {
      for (const finding of unit.finding_list) parts.push(findingCard(finding));
    } else {
      parts.push(el("p", "hint", "No finding in this unit of work."));
    }
    const pool = unit.pool;
    parts.push(el("h2", "", "Connection pool"));
    parts.push(
      facts([
        ["Checkouts", pool.checkouts],
        ["Wait", ms(pool.wait_ms)],
        ["Timeouts", pool.timeouts],
        ["Most held at once", pool.max_held],
        ["Leaked", pool.leaked],
      ]),
    );
    let heading = `Statements (${unit.statements}, ${unit.groups.length} distinct)`;
    parts.push(el("h2", "", heading));
    if (unit.statements_kept < unit.statements) {
      parts.push(el("p", "hint", `The first ${unit.statements_kept} statements are kept (Settings.max_queries).`));
    }
    if (!unit.log_parameters) {
      parts.push(el("p", "hint", "Bound parameter values are not shown (Settings.log_parameters is off)."));
    }
    parts.push(el("div", "scroll", statementsTable(unit)));
    parts.push(executionOrder(unit));
    target.replaceChildren(...parts);
  }

  // --- routes view -------------------------------------------------------------------------

  function renderRoutes() {
    const { key, dir } = state.sort;
    const rows = state.routes.slice().sort((a, b) => {
      const x = a[key] ?? "";
      const y = b[key] ?? "";
      if (x < y) return -dir;
      if (x > y) return dir;
      return 0;
    });
    for (const th of $("routes-head").querySelectorAll("th")) {
      if (th.dataset.key === key) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    $("routes-body").replaceChildren(
      ...rows.map((route) => {
        const name = el("td", "");
        const link = el("a", "route", `${route.method} ${route.route}`.trim());
        link.setAttribute("href", "#/units");
        link.addEventListener("click", () => {
          $("f-route").value = route.route;
        });
        name.append(link);
        return el(
          "tr",
          "",
          name,
          el("td", "num", route.requests),
          el("td", "num", route.statements_median),
          el("td", "num", route.statements_p95),
          el("td", "num", route.statements_max),
          el("td", "num", route.db_ms_total.toFixed(1)),
          el("td", "num opt", route.db_ms_mean.toFixed(2)),
          el("td", "num", `${Math.round(route.n_plus_one_rate * 100)} %`),
          el("td", "opt", route.last_finding ? badge(route.last_finding, 1) : ""),
        );
      }),
    );
  }

  async function showRoutes() {
    try {
      state.routes = (await api("api/routes")).routes;
      renderRoutes();
    } catch (error) {
      $("routes-body").replaceChildren(el("tr", "", el("td", "error", error.message)));
    }
  }

  // --- navigation --------------------------------------------------------------------------

  function currentView() {
    const hash = location.hash || "#/units";
    if (hash.startsWith("#/units/")) return "unit";
    if (hash === "#/routes") return "routes";
    return "units";
  }

  async function route() {
    const view = currentView();
    $("view-units").hidden = view !== "units";
    $("view-unit").hidden = view !== "unit";
    $("view-routes").hidden = view !== "routes";
    $("nav-units").classList.toggle("current", view !== "routes");
    $("nav-routes").classList.toggle("current", view === "routes");
    $("live").hidden = view !== "units";
    if (view === "unit") {
      clearTimeout(state.timer);
      await showUnit(decodeURIComponent(location.hash.slice("#/units/".length)));
    } else if (view === "routes") {
      clearTimeout(state.timer);
      await showRoutes();
    } else {
      await reloadUnits();
    }
  }

  function start() {
    for (const id of ["f-route", "f-slower"]) $(id).addEventListener("input", reloadUnits);
    for (const id of ["f-kind", "f-finding", "f-findings"]) {
      $(id).addEventListener("change", reloadUnits);
    }
    $("f-pause").addEventListener("change", schedule);
    for (const th of $("routes-head").querySelectorAll("th")) {
      th.querySelector("button").addEventListener("click", () => {
        const key = th.dataset.key;
        state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : key === "route" ? 1 : -1 };
        renderRoutes();
      });
    }
    window.addEventListener("hashchange", route);
    route();
  }

  start();
})();
