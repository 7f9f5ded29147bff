// Front end of the %sandbox_ssh widget (anywidget ESM, no build step).
// The full ssh command arrives only in a "hello" custom message and lives in this
// view's memory; synced model state carries the masked command alone.
// The kernel keeps the state true while it runs; that the kernel itself is gone
// (restarted, shut down: its comm is no longer live) only the view can tell.

const LOG_LIMIT = 1000;
const KILL_WAIT_MS = 15000; // a kill the kernel has not answered by then is reported

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function duration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (h) return `${h}h${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m${String(s).padStart(2, "0")}s`;
  return `${s}s`;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el("textarea");
  area.value = text;
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  if (!copied) throw new Error("the browser refused to copy");
}

function button(label, title, className = "") {
  const node = el("button", `jsbw-button ${className}`.trim(), label);
  node.type = "button";
  if (title) node.title = title;
  return node;
}

function render({ model, el: root }) {
  let command = null;
  let clockOffset = 0; // kernel time minus browser time, in seconds
  let killSent = null; // when a confirmed kill was sent, until the kernel answers

  const box = el("div", "jsbw-ssh");
  const head = el("div", "jsbw-head");
  const title = el("span", "jsbw-title");
  const status = el("span", "jsbw-status");
  const dot = el("span", "jsbw-dot");
  dot.setAttribute("aria-hidden", "true");
  const statusText = el("span", "jsbw-status-text");
  status.append(dot, statusText);
  head.append(title, status);

  const cmdRow = el("div", "jsbw-row");
  const cmd = el("code", "jsbw-command jsbw-field");
  const copy = button("Copy", "copy the whole ssh command");
  cmdRow.append(cmd, copy);

  const hostKey = el("div", "jsbw-detail jsbw-field");
  const sandboxLeft = el("div", "jsbw-detail jsbw-sandbox-left");
  const sshLeft = el("div", "jsbw-detail jsbw-ssh-left");
  const recording = el("div", "jsbw-detail jsbw-recording", "terminal sessions are recorded");

  const buttons = el("div", "jsbw-row jsbw-buttons");
  const kill = button("Kill", "end the sandbox and delete its files", "jsbw-danger");
  const restart = button("Restart", "start the failed sandbox again, with its files");
  const extend = button("Extend +10m");
  const revoke = button("Revoke SSH", "this credential stops working; the sandbox keeps running");
  const confirm = el("span", "jsbw-confirm");
  const confirmText = el("span", "jsbw-confirm-text");
  const confirmYes = button("Kill it", "", "jsbw-danger");
  const confirmNo = button("Cancel");
  confirm.append(confirmText, confirmYes, confirmNo);
  confirm.hidden = true;
  buttons.append(kill, restart, extend, revoke, confirm);
  const message = el("div", "jsbw-message");
  message.setAttribute("role", "status");

  const logHead = el("div", "jsbw-detail", "logs");
  const logs = el("pre", "jsbw-logs");
  let lineCount = 0;
  box.append(head, cmdRow, hostKey, sandboxLeft, sshLeft, recording, buttons, message);
  box.append(logHead, logs);
  root.appendChild(box);

  const now = () => Date.now() / 1000 + clockOffset;

  // The kernel that runs this widget is gone: a restart or a shutdown took its comm
  // (a kernel that restarts keeps its connection object, so its status tells).
  const kernel = model.widget_manager && model.widget_manager.kernel;
  let restarted = false;
  const onKernelStatus = (_, state) => {
    if (["restarting", "autorestarting", "dead"].includes(state) && !restarted) {
      restarted = true;
      update();
    }
  };
  if (kernel && kernel.statusChanged) kernel.statusChanged.connect(onKernelStatus);
  function kernelGone() {
    if (restarted || root.closest(".jupyter-widgets-disconnected")) return true;
    return Boolean(kernel && (kernel.isDisposed || kernel.status === "dead"));
  }

  // What is true now, from the model, the clock and the kernel's presence.
  function truth() {
    const state = model.get("status");
    const session = model.get("expires_at") === null;
    if (kernelGone() && (state === "running" || state === "failed")) {
      const reason = "its kernel restarted or shut down";
      return session
        ? { state: "ended", reason, detail: `${reason} (a session sandbox ends with it)`, ssh: "closed" }
        : { state: "unknown", reason, detail: "not known: this view has no kernel to ask", ssh: "unknown" };
    }
    let ssh = model.get("ssh_status");
    const sshExpires = model.get("ssh_expires_at");
    if (ssh === "active" && sshExpires !== null && sshExpires <= now()) ssh = "expired";
    if (state !== "running" && state !== "failed") ssh = "closed";
    return { state, reason: state === "failed" ? model.get("failure") : model.get("end_reason"), ssh };
  }

  function appendLines(lines, skipped) {
    const atBottom = logs.scrollHeight - logs.scrollTop - logs.clientHeight < 24;
    const fragment = document.createDocumentFragment();
    if (skipped) fragment.appendChild(el("div", "jsbw-event", `… ${skipped} lines skipped`));
    for (const [stream, source, text] of lines) {
      // Every line says where it comes from, as the panel's do: output cannot pass for a
      // note of the service ("[service] instructor bob: ...").
      const where =
        stream === "audit" ? "service" : stream === "event" ? source : `${source}:${stream}`;
      const shown = text.replace(/[\r\n]/g, (c) => `\\x0${c.charCodeAt(0).toString(16)}`);
      const line = el("div", `jsbw-${stream}`, `[${where}] ${shown}`);
      fragment.appendChild(line);
    }
    logs.appendChild(fragment);
    lineCount += lines.length + (skipped ? 1 : 0);
    while (lineCount > LOG_LIMIT) {
      logs.firstChild.remove();
      lineCount -= 1;
    }
    if (atBottom) logs.scrollTop = logs.scrollHeight;
  }

  function showConfirm(open) {
    confirm.hidden = !open;
    for (const b of [kill, restart, extend, revoke]) b.classList.toggle("jsbw-hidden", open);
    if (open) {
      confirmText.textContent = `Kill sandbox "${model.get("sandbox_name")}"? Its files are deleted.`;
      confirmNo.focus();
    }
  }

  function update() {
    const t = truth();
    const running = t.state === "running";
    const failed = t.state === "failed";
    const sshActive = running && t.ssh === "active";
    if (!(running || failed)) killSent = null;
    title.textContent = `SSH · sandbox "${model.get("sandbox_name")}"`;
    title.title = `sandbox ${model.get("sandbox_id")}`;
    statusText.textContent = running ? `running · credential ${t.ssh}`
      : failed ? `failed: ${t.reason}`
      : t.state === "unknown" ? `not live: ${t.reason}`
      : `ended: ${t.reason || "ended"}`;
    status.dataset.state = running ? (sshActive ? "ok" : "warn")
      : failed ? "failed" : t.state === "unknown" ? "warn" : "ended";
    box.dataset.state = status.dataset.state;
    const shown = sshActive && command ? command : model.get("masked_command");
    cmd.textContent = shown;
    cmd.title = model.get("masked_command"); // never the token: titles can be read off screen
    cmd.classList.toggle("jsbw-inactive", !sshActive);
    copy.disabled = !(sshActive && command);
    hostKey.textContent = `host key ${model.get("host_key_fingerprint")}`;
    hostKey.title = model.get("host_key_fingerprint");
    recording.hidden = !model.get("recording");
    const live = (running || failed) && killSent === null;
    kill.disabled = !live;
    restart.hidden = !failed;
    restart.disabled = !live;
    revoke.disabled = !(sshActive && killSent === null);
    extend.disabled = !live || model.get("expires_at") === null;
    extend.title = model.get("expires_at") === null
      ? "a session sandbox lives as long as its kernel" : "push the deadline 10 minutes further";
    if (!live) showConfirm(false);
    message.textContent = kernelGone()
      ? "This view lost its kernel: run %sandbox_ssh again for a live one."
      : killSent !== null ? "killing…" : model.get("message");
    tick();
  }

  function tick() {
    const t = truth();
    const expires = model.get("expires_at");
    const kept = expires === null ? "while its kernel runs" : `for ${duration(expires - now())}`;
    sandboxLeft.textContent = t.state === "failed" && !model.get("files_kept")
      ? "sandbox failed: its files are not kept (Restart starts it with an empty home, or Kill;"
        + " JUPYTER_SANDBOX_K8S_HOME=pvc on the service keeps homes across failures)"
      : t.state === "failed"
      ? `sandbox failed: its files are kept ${kept} (download them, Restart or Kill)`
      : t.state === "unknown" ? `sandbox: ${t.detail}`
      : t.state !== "running" ? `sandbox ended: ${t.detail || t.reason || "ended"}`
      : expires === null ? "sandbox: session (ends with its kernel)"
      : `sandbox: ${duration(expires - now())} left`;
    const sshExpires = model.get("ssh_expires_at");
    sshLeft.textContent = t.state === "failed" && t.ssh === "active"
      ? "credential: logins refused until a restart"
      : t.ssh === "active" ? (sshExpires === null
        ? "credential: valid until revoked or the sandbox ends"
        : `credential: ${duration(sshExpires - now())} left`)
      : `credential: ${t.ssh}`;
    if (t.ssh !== "active" && !copy.disabled) update(); // it expired this second
    if (killSent !== null && Date.now() - killSent > KILL_WAIT_MS) {
      killSent = null;
      message.textContent = "the kernel did not answer the kill: is a cell still running?"
        + " Try again when it is idle, or use %sandbox kill";
    }
  }

  function onMessage(msg) {
    if (msg.type === "hello") {
      command = msg.command;
      clockOffset = msg.now - Date.now() / 1000;
      if (msg.lines.length) {
        logs.replaceChildren();
        lineCount = 0;
        appendLines(msg.lines, 0);
      }
      update();
    } else if (msg.type === "logs") {
      appendLines(msg.lines, msg.skipped);
    }
  }

  // An action needs a live kernel: without one, say so rather than send into nothing.
  function act(type) {
    if (kernelGone()) {
      update();
      return false;
    }
    model.send({ type });
    return true;
  }

  copy.addEventListener("click", async () => {
    try {
      await copyText(command);
      copy.textContent = "Copied";
    } catch (e) {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  kill.addEventListener("click", () => showConfirm(true));
  confirmNo.addEventListener("click", () => { showConfirm(false); kill.focus(); });
  confirmYes.addEventListener("click", () => {
    showConfirm(false);
    if (act("kill")) killSent = Date.now();
    update();
  });
  restart.addEventListener("click", () => act("restart"));
  extend.addEventListener("click", () => act("extend"));
  revoke.addEventListener("click", () => act("revoke"));

  const onLive = () => update();
  const onAnswer = () => { killSent = null; update(); }; // the kernel answered an action
  model.on("msg:custom", onMessage);
  model.on("change", update);
  model.on("change:message", onAnswer);
  model.on("comm_live_update", onLive);
  const timer = setInterval(tick, 1000);
  update();
  if (!kernelGone()) model.send({ type: "ready" });

  return () => {
    clearInterval(timer);
    if (kernel && kernel.statusChanged) kernel.statusChanged.disconnect(onKernelStatus);
    model.off("msg:custom", onMessage);
    model.off("change", update);
    model.off("change:message", onAnswer);
    model.off("comm_live_update", onLive);
  };
}

export default { render };
