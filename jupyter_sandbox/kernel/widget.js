// Front end of the %sandbox_ssh widget (anywidget ESM, no build step).
// The full ssh command arrives only in a "hello" custom message and lives in this
// view's memory; synced model state carries the masked command alone.

const LOG_LIMIT = 1000;

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
  document.execCommand("copy");
  area.remove();
}

function render({ model, el: root }) {
  let command = null;
  let clockOffset = 0; // kernel time minus browser time, in seconds

  const box = el("div", "jsbw-ssh");
  const head = el("div", "jsbw-head");
  const title = el("span", "jsbw-title");
  const status = el("span", "jsbw-status");
  head.append(title, status);

  const cmdRow = el("div", "jsbw-row");
  const cmd = el("code", "jsbw-command");
  const copy = el("button", "jsbw-button", "Copy");
  copy.title = "copy the ssh command";
  cmdRow.append(cmd, copy);

  const hostKey = el("div", "jsbw-detail");
  const sandboxLeft = el("div", "jsbw-detail jsbw-sandbox-left");
  const sshLeft = el("div", "jsbw-detail jsbw-ssh-left");

  const buttons = el("div", "jsbw-row");
  const kill = el("button", "jsbw-button jsbw-danger", "Kill");
  const restart = el("button", "jsbw-button", "Restart");
  restart.title = "start the failed sandbox again, with its files";
  const extend = el("button", "jsbw-button", "Extend +10m");
  const revoke = el("button", "jsbw-button", "Revoke SSH");
  const message = el("span", "jsbw-message");
  buttons.append(kill, restart, extend, revoke, message);

  const logHead = el("div", "jsbw-detail", "logs");
  const logs = el("pre", "jsbw-logs");
  let lineCount = 0;
  box.append(head, cmdRow, hostKey, sandboxLeft, sshLeft, buttons, logHead, logs);
  root.appendChild(box);

  const now = () => Date.now() / 1000 + clockOffset;

  function appendLines(lines, skipped) {
    const atBottom = logs.scrollHeight - logs.scrollTop - logs.clientHeight < 24;
    const fragment = document.createDocumentFragment();
    if (skipped) fragment.appendChild(el("div", "jsbw-event", `… ${skipped} lines skipped`));
    for (const [stream, source, text] of lines) {
      const line = el("div", `jsbw-${stream}`, stream === "event" ? `[${source}] ${text}` : text);
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

  function update() {
    const running = model.get("status") === "running";
    const failed = model.get("status") === "failed";
    const sshActive = running && model.get("ssh_status") === "active";
    title.textContent = `SSH · sandbox "${model.get("sandbox_name")}" (${model.get("sandbox_id")})`;
    status.textContent = running ? `● running · credential ${model.get("ssh_status")}`
      : failed ? `■ failed: ${model.get("failure")}`
      : `■ ${model.get("status")}`;
    status.dataset.state = running ? (sshActive ? "ok" : "warn") : failed ? "failed" : "ended";
    cmd.textContent = sshActive && command ? command : model.get("masked_command");
    cmd.classList.toggle("jsbw-inactive", !sshActive);
    copy.disabled = !(sshActive && command);
    hostKey.textContent = `host key ${model.get("host_key_fingerprint")}`;
    kill.disabled = !(running || failed);
    restart.hidden = !failed;
    revoke.disabled = !sshActive;
    extend.disabled = !(running || failed) || model.get("expires_at") === null;
    extend.title = model.get("expires_at") === null
      ? "a session sandbox lives as long as its kernel" : "push the deadline 10 minutes further";
    message.textContent = model.get("message");
    tick();
  }

  function tick() {
    const running = model.get("status") === "running";
    const expires = model.get("expires_at");
    const kept = expires === null ? "while its kernel runs" : `for ${duration(expires - now())}`;
    sandboxLeft.textContent = model.get("status") === "failed"
      ? `sandbox failed: its files are kept ${kept} (download them, Restart or Kill)`
      : !running ? "sandbox ended"
      : expires === null ? "sandbox: session (ends with its kernel)"
      : `sandbox: ${duration(expires - now())} left`;
    const sshExpires = model.get("ssh_expires_at");
    const sshActive = running && model.get("ssh_status") === "active";
    const failedNow = model.get("status") === "failed" && model.get("ssh_status") === "active";
    sshLeft.textContent = failedNow ? "credential: logins refused until a restart"
      : !sshActive ? `credential ${running ? model.get("ssh_status") : "closed"}`
      : sshExpires === null ? "credential: valid until revoked or the sandbox ends"
      : sshExpires <= now() ? "credential expired"
      : `credential: ${duration(sshExpires - now())} left`;
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

  copy.addEventListener("click", async () => {
    try {
      await copyText(command);
      copy.textContent = "Copied";
    } catch (e) {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  kill.addEventListener("click", () => model.send({ type: "kill" }));
  restart.addEventListener("click", () => model.send({ type: "restart" }));
  extend.addEventListener("click", () => model.send({ type: "extend" }));
  revoke.addEventListener("click", () => model.send({ type: "revoke" }));

  model.on("msg:custom", onMessage);
  model.on("change", update);
  const timer = setInterval(tick, 1000);
  update();
  model.send({ type: "ready" });

  return () => {
    clearInterval(timer);
    model.off("msg:custom", onMessage);
    model.off("change", update);
  };
}

export default { render };
