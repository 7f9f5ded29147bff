// The instructor dashboard: a table of every user's sandboxes, refreshed from the
// dashboard's API; actions POST with the hub's XSRF cookie. No token is in a URL
// or in the page until an instructor asks for a terminal command.
"use strict";
(() => {
  const prefix = document.body.dataset.prefix;
  const interval = Number(document.body.dataset.interval) || 2000;
  const $ = (id) => document.getElementById(id);
  const state = { sandboxes: [], sort: { key: "user", dir: 1 }, logs: null };

  function xsrf() {
    const m = document.cookie.match(/(?:^|;\s*)_xsrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : "";
  }

  async function api(method, path, body) {
    const response = await fetch(prefix + "api/" + path, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-XSRFToken": xsrf() },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
    if (!response.ok) {
      const message = (data && data.message) || `${response.status} ${response.statusText}`;
      throw new Error(message);
    }
    return data;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  // What the last action did (or why it failed); the refresh time goes beside it.
  function say(text, error) {
    const s = $("jsd-message");
    s.textContent = text;
    s.classList.toggle("jsd-error", !!error);
  }

  const left = (s) => (s.expires_at ? s.expires_at - Date.now() / 1000 : Infinity);
  function duration(seconds) {
    if (!isFinite(seconds)) return "session";
    if (seconds <= 0) return "expiring";
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60);
    const sec = Math.floor(seconds % 60);
    return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
  }
  function size(bytes) {
    if (bytes === null || bytes === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i += 1; }
    return `${i ? bytes.toFixed(1) : bytes} ${units[i]}`;
  }
  const usage = (s) => (s.usage && s.usage.available ? s.usage : null);
  const cpu = (s) => (usage(s) && usage(s).cpu_percent !== null ? usage(s).cpu_percent : -1);
  const memory = (s) => (usage(s) ? usage(s).memory_bytes || 0 : -1);
  const keys = {
    user: (s) => s.user || "", name: (s) => s.name || s.id, status: (s) => s.status,
    left, cpu, memory,
  };

  function visible() {
    const q = $("jsd-search").value.trim().toLowerCase();
    const user = $("jsd-user").value, status = $("jsd-state").value;
    const key = keys[state.sort.key], dir = state.sort.dir;
    return state.sandboxes
      .filter((s) => !user || s.user === user)
      .filter((s) => !status || s.status === status)
      .filter((s) => !q || [s.user, s.name, s.id, s.owner,
        ...Object.entries(s.labels || {}).map(([k, v]) => `${k}=${v}`)]
        .some((t) => String(t || "").toLowerCase().includes(q)))
      .sort((a, b) => {
        const x = key(a), y = key(b);
        return (x < y ? -1 : x > y ? 1 : 0) * dir || a.id.localeCompare(b.id);
      });
  }

  function actions(s) {
    const box = el("td", { class: "jsd-actions" });
    const button = (label, handler, cls) =>
      box.append(el("button", { class: "jsd-btn " + (cls || ""), "data-action": label.toLowerCase(),
        onclick: handler }, label));
    button("Logs", () => openLogs(s));
    button("Terminal", () => terminal(s));
    button("Extend", () => extend(s));
    if (s.status === "failed") button("Restart", () => act(s, "POST", "restart", "restarted"));
    button("Kill", () => kill(s), "jsd-danger");
    return box;
  }

  function row(s) {
    const u = usage(s);
    const secs = left(s);
    const limit = s.limits && s.limits.memory;
    return el("tr", { "data-id": s.id, "data-user": s.user || "" },
      el("td", { class: "jsd-user" }, s.user || "?"),
      el("td", {}, el("span", { class: "jsd-name" }, s.name || s.id),
        s.name && s.name !== s.id ? el("span", { class: "jsd-id" }, s.id) : null),
      el("td", {}, el("span", { class: `jsd-state jsd-state-${s.status}` }, s.status),
        s.failure ? el("div", { class: "jsd-why" }, s.failure) : null),
      el("td", { class: "jsd-num jsd-left" + (secs < 120 ? " jsd-soon" : "") }, duration(secs)),
      el("td", { class: "jsd-num jsd-cpu" },
        u && u.cpu_percent !== null ? `${u.cpu_percent.toFixed(0)} %` : "–"),
      el("td", { class: "jsd-num jsd-memory" },
        u ? size(u.memory_bytes) + (limit ? ` / ${size(limit)}` : "") : "–"),
      el("td", {}, ...Object.entries(s.labels || {}).filter(([k]) => k !== "kernel")
        .map(([k, v]) => el("span", { class: "jsd-label" }, v ? `${k}=${v}` : k))),
      actions(s));
  }

  function render() {
    const rows = visible();
    $("jsd-rows").replaceChildren(...rows.map(row));
    $("jsd-empty").hidden = rows.length > 0;
    const users = [...new Set(state.sandboxes.map((s) => s.user).filter(Boolean))].sort();
    const select = $("jsd-user"), chosen = select.value;
    if (select.options.length - 1 !== users.length ||
        users.some((u, i) => select.options[i + 1].value !== u)) {
      select.replaceChildren(el("option", { value: "" }, "all"),
        ...users.map((u) => el("option", { value: u }, u)));
      select.value = users.includes(chosen) ? chosen : "";
    }
    $("jsd-count").textContent =
      `${rows.length} of ${state.sandboxes.length} sandboxes · ${users.length} users`;
    for (const th of document.querySelectorAll("th[data-key]")) {
      th.setAttribute("aria-sort", th.dataset.key !== state.sort.key ? "none"
        : state.sort.dir > 0 ? "ascending" : "descending");
    }
  }

  async function refresh() {
    try {
      state.sandboxes = (await api("GET", "sandboxes")).sandboxes;
      $("jsd-status").textContent = `updated ${new Date().toLocaleTimeString()}`;
      $("jsd-status").classList.remove("jsd-error");
      render();
    } catch (e) {
      $("jsd-status").textContent = `cannot load the sandboxes: ${e.message}`;
      $("jsd-status").classList.add("jsd-error");
    }
  }

  function dialog(title, body, ok, danger) {
    const d = $("jsd-dialog");
    $("jsd-dialog-title").textContent = title;
    $("jsd-dialog-body").replaceChildren(...body);
    const button = $("jsd-dialog-ok");
    button.textContent = ok;
    button.classList.toggle("jsd-danger", !!danger);
    $("jsd-dialog-cancel").hidden = !ok || ok === "Close";
    d.showModal();
    return new Promise((resolve) => d.addEventListener("close",
      () => resolve(d.returnValue === "ok"), { once: true }));
  }

  const label = (s) => `${s.user}'s sandbox ${s.name || s.id}`;

  async function act(s, method, path, done, body) {
    try {
      await api(method, path ? `sandboxes/${s.id}/${path}` : `sandboxes/${s.id}`, body);
      say(`${label(s)} ${done}`);
    } catch (e) {
      say(`${label(s)}: ${e.message}`, true);
    }
    refresh();
  }

  async function kill(s) {
    const ok = await dialog(`Kill ${label(s)}?`,
      [el("p", {}, "Its processes end and its files are deleted. "
        + `${s.user} sees in the sandbox's log that you killed it.`)], "Kill", true);
    if (ok) act(s, "DELETE", "", "killed");
  }

  async function extend(s) {
    const input = el("input", { id: "jsd-extend-by", value: "10m", "aria-label": "Time to add" });
    const ok = await dialog(`Add time to ${label(s)}`,
      [el("p", {}, `Time left: ${duration(left(s))}. Add:`), input,
        el("p", {}, "e.g. 10m, 1h, 90s. Time is added; it never shortens.")], "Extend");
    if (ok) act(s, "POST", "extend", `extended by ${input.value}`, { add: input.value });
  }

  async function terminal(s) {
    let access;
    try {
      access = await api("POST", `sandboxes/${s.id}/ssh`);
    } catch (e) {
      say(`${label(s)}: ${e.message}`, true);
      return;
    }
    const url = location.origin + prefix;
    const tunnel = `ssh -o ProxyCommand='jupyter-sandbox tunnel --url ${url} %h' `
      + `${access.token}@${s.id}`;
    const copyable = (id, text) => [el("code", { id }, text), el("button", {
      class: "jsd-btn", type: "button", "data-action": "copy",
      onclick: (e) => navigator.clipboard.writeText(text).then(
        () => { e.target.textContent = "Copied"; }, () => { e.target.textContent = "Select and copy"; }),
    }, "Copy")];
    await dialog(`Terminal in ${label(s)}`, [
      el("p", {}, "Run this where jupyter-sandbox is installed, with $JUPYTER_TOKEN set to "
        + "your hub API token (hub menu: Token):"),
      ...copyable("jsd-tunnel-command", tunnel),
      ...(access.command ? [el("p", {}, "Or from a machine that reaches the SSH gateway:"),
        ...copyable("jsd-ssh-command", access.command)] : []),
      el("p", {}, `Good for one connection, and secret until used. Host key `
        + `${access.host_key_fingerprint}. ${s.user} sees your session in the sandbox's log.`),
    ], "Close");
  }

  // An entry's text on one line: a line break inside it (a command's, say) is shown as
  // \x0a, so no text can start a line of its own.
  const oneLine = (text) =>
    text.replace(/\n$/, "").replace(/[\r\n]/g, (c) => `\\x0${c.charCodeAt(0).toString(16)}`);

  // The log is read with fetch rather than EventSource, which cannot send the XSRF
  // header: the token stays out of the URL.
  async function openLogs(s) {
    if (state.logs) state.logs.abort();
    const text = $("jsd-logs-text");
    text.replaceChildren();
    $("jsd-logs-title").textContent = `Log of ${label(s)}`;
    $("jsd-logs").hidden = false;
    const controller = new AbortController();
    state.logs = controller;
    const show = (entry) => {
      const when = new Date(entry.time * 1000).toLocaleTimeString();
      // The source on every line, as the panel shows it: a sandbox's output cannot pass
      // for a note of the service ("[service] instructor bob: ...").
      const where = entry.stream === "audit" ? "service"
        : entry.stream === "event" ? entry.source : `${entry.source}:${entry.stream}`;
      const kind = entry.stream;
      text.append(el("span", { class: "jsd-log-time" }, when + " "),
        el("span", { class: `jsd-log-${kind}` },
          `[${where}] ${oneLine(entry.text)}\n`));
      text.scrollTop = text.scrollHeight;
    };
    const note = (why) => text.append(el("em", {}, why));
    try {
      const response = await fetch(`${prefix}api/sandboxes/${s.id}/logs`, {
        credentials: "same-origin", headers: { "X-XSRFToken": xsrf() },
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const kind = (event.match(/^event: (.*)$/m) || [])[1] || "message";
          const data = JSON.parse((event.match(/^data: (.*)$/m) || [])[1] || "{}");
          if (kind === "message") show(data);
          else if (kind === "end") note("— the sandbox ended —");
          else note(data.message || kind);
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") note(`— the log stream broke off: ${e.message} —`);
    }
  }

  $("jsd-logs-close").addEventListener("click", () => {
    if (state.logs) state.logs.abort();
    $("jsd-logs").hidden = true;
  });
  for (const id of ["jsd-search", "jsd-user", "jsd-state"]) $(id).addEventListener("input", render);
  for (const th of document.querySelectorAll("th[data-key]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.key;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      render();
    });
  }
  setInterval(() => { if (!document.hidden) refresh(); }, interval);
  setInterval(() => { for (const td of document.querySelectorAll(".jsd-left")) {
    const s = state.sandboxes.find((x) => x.id === td.parentElement.dataset.id);
    if (s) td.textContent = duration(left(s));
  } }, 1000);
  refresh();
})();
