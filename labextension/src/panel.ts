/**
 * The "Sandboxes" side panel: every sandbox with its state, time left, limits,
 * live CPU and memory charts, and actions.
 */
import {
  Clipboard,
  Dialog,
  InputDialog,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import {
  FeedMessage,
  ICreateOptions,
  ILogEntry,
  ISandbox,
  ISshAccess,
  IUsage,
  openSocket,
  request,
  tunnelCommand
} from './api';

const HISTORY = 60;
const RECONNECT_MS = 2000;

/** Opens a JupyterLab terminal by name (the panel does not depend on the terminal plugin). */
export type OpenTerminal = (name: string) => Promise<void>;

interface ISample {
  cpu: number;
  memory: number;
}

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${s % 60}s`;
  }
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(unit > 1 ? 1 : 0)} ${units[unit]}`;
}

/** Actions that need the sandbox's processes: off while it is failed. */
const LIVE_ACTIONS = new Set(['copy-ssh', 'copy-tunnel', 'terminal', 'revoke']);

function timeLeft(sandbox: ISandbox): string {
  const failed = sandbox.status === 'failed';
  if (sandbox.status !== 'running' && !failed) {
    return sandbox.status;
  }
  if (sandbox.expires_at === null) {
    return failed ? 'files kept for the session' : 'session';
  }
  const left = formatDuration(sandbox.expires_at - Date.now() / 1000);
  return failed ? `files kept ${left}` : `${left} left`;
}

/** An empty polyline chart; `plot` draws into it. */
function sparkline(cls: string): SVGSVGElement {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', `0 0 ${HISTORY} 20`);
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('class', `jsb-chart ${cls}`);
  svg.append(document.createElementNS(ns, 'polyline'));
  return svg;
}

/** Draw the last samples into a `sparkline`, scaled to `max`. */
function plot(chart: SVGSVGElement, values: number[], max: number): void {
  const offset = HISTORY - values.length;
  const points = values.map(
    (v, i) => `${offset + i},${(20 - (Math.min(v, max) / (max || 1)) * 19).toFixed(1)}`
  );
  setAttr(chart.firstElementChild as Element, 'points', points.join(' '));
}

/*
 * The panel updates its nodes in place and only where something changed, so that a
 * refresh (every usage sample) never disturbs a selection, a focused input or a scroll.
 */

function setText(node: Node, text: string): void {
  if (node.textContent !== text) {
    node.textContent = text;
  }
}

function setAttr(node: Element, name: string, value: string): void {
  if (node.getAttribute(name) !== value) {
    node.setAttribute(name, value);
  }
}

function setValue(node: HTMLInputElement, value: string): void {
  if (node.value !== value) {
    node.value = value;
  }
}

/** Make `node` a child of `parent` (appended) or not, without moving it needlessly. */
function place(parent: Element, node: Element, present: boolean): void {
  if (present && node.parentElement !== parent) {
    parent.append(node);
  } else if (!present) {
    node.remove();
  }
}

/** A sandbox's card and the nodes that change. */
interface ICard {
  node: HTMLElement;
  name: HTMLElement;
  status: HTMLElement;
  failure: HTMLElement;
  owner: HTMLElement;
  left: HTMLElement;
  limits: HTMLElement;
  labels: HTMLElement;
  usage: HTMLElement;
  cpu: HTMLElement;
  cpuChart: SVGSVGElement;
  memory: HTMLElement;
  memoryChart: SVGSVGElement;
  ssh: HTMLInputElement;
  tunnel: HTMLInputElement;
}

export class SandboxPanel extends Widget {
  constructor(openTerminal: OpenTerminal) {
    super();
    this.openTerminal = openTerminal;
    this.id = 'jupyter-sandbox-panel';
    this.addClass('jsb-Panel');
    this.title.caption = 'Sandboxes';
    this.node.append(this.header(), this.form, this.list);
    this.form.hidden = true;
    this.connect();
    this.clock = window.setInterval(() => this.tick(), 1000);
  }

  dispose(): void {
    window.clearInterval(this.clock);
    this.socket?.close();
    this.logs.forEach(socket => socket.close());
    super.dispose();
  }

  private header(): HTMLElement {
    const toggle = h(
      'button',
      { class: 'jp-Button jsb-new', 'data-action': 'new' },
      'New sandbox'
    );
    toggle.onclick = () => (this.form.hidden = !this.form.hidden);
    return h(
      'header',
      { class: 'jsb-header' },
      h('h2', {}, 'Sandboxes'),
      this.count,
      toggle
    );
  }

  private buildForm(): HTMLFormElement {
    const field = (label: string, name: string, placeholder = '', value = '') =>
      h('label', {}, label, h('input', { name, placeholder, value }));
    const network = h(
      'select',
      { name: 'network' },
      h('option', {}, 'none'),
      h('option', {}, 'host')
    );
    const form = h(
      'form',
      { class: 'jsb-form' },
      field('Name', 'name', 'optional'),
      field('Timeout', 'timeout', 'session, 30s, 5m', '10m'),
      field('Memory', 'memory', 'e.g. 512M'),
      field('CPUs', 'cpus', 'e.g. 0.5'),
      field('Processes', 'pids', 'e.g. 256'),
      h('label', {}, 'Network', network),
      h(
        'label',
        {
          title:
            "A directory on the Jupyter server, relative to its root, copied into the sandbox's home (as %%sandbox --image DIR)"
        },
        'Image directory',
        h('input', { name: 'image', placeholder: 'e.g. course/image' })
      ),
      h(
        'label',
        {},
        'Environment',
        h('textarea', { name: 'env', placeholder: 'KEY=value per line' })
      ),
      h('button', { class: 'jp-Button jp-mod-accept', type: 'submit' }, 'Create')
    );
    form.onsubmit = event => {
      event.preventDefault();
      const data = new FormData(form);
      const options: ICreateOptions = { network: String(data.get('network')) };
      for (const key of ['name', 'timeout', 'memory', 'image'] as const) {
        const value = String(data.get(key) || '').trim();
        if (value) {
          options[key] = value;
        }
      }
      for (const key of ['cpus', 'pids'] as const) {
        const value = String(data.get(key) || '').trim();
        if (value) {
          options[key] = Number(value);
        }
      }
      const env = String(data.get('env') || '')
        .split('\n')
        .map(line => line.trim().split(/=(.*)/s))
        .filter(([key]) => key);
      if (env.length) {
        options.env = Object.fromEntries(env.map(([key, value]) => [key, value ?? '']));
      }
      void this.act('Create sandbox', async () => {
        await request('POST', ['sandboxes'], options);
        form.hidden = true;
      });
    };
    return form;
  }

  /** Follow the server's feed; reconnect after a drop. */
  private connect(): void {
    const socket = openSocket(['events']);
    this.socket = socket;
    socket.onmessage = event => this.onFeed(JSON.parse(event.data) as FeedMessage);
    socket.onclose = () => {
      if (!this.isDisposed) {
        window.setTimeout(() => this.connect(), RECONNECT_MS);
      }
    };
  }

  private onFeed(message: FeedMessage): void {
    switch (message.type) {
      case 'snapshot':
        this.sandboxes = new Map(message.sandboxes.map(s => [s.id, s]));
        break;
      case 'created':
      case 'updated':
        this.sandboxes.set(message.sandbox.id, {
          ...this.sandboxes.get(message.sandbox.id),
          ...message.sandbox
        });
        break;
      case 'ended':
        this.forget(message.sandbox.id);
        break;
      case 'usage':
        this.record(message.usage);
        break;
    }
    this.render();
  }

  private record(usage: Record<string, IUsage | null>): void {
    for (const [id, sample] of Object.entries(usage)) {
      const sandbox = this.sandboxes.get(id);
      if (!sandbox) {
        continue;
      }
      sandbox.usage = sample;
      const samples = this.history.get(id) ?? [];
      samples.push({ cpu: sample?.cpu_percent ?? 0, memory: sample?.memory_bytes ?? 0 });
      this.history.set(id, samples.slice(-HISTORY));
    }
  }

  /** Bring the cards up to date: new ones added, ended ones removed, the rest updated. */
  private render(): void {
    const sandboxes = [...this.sandboxes.values()].sort(
      (a, b) => b.created_at - a.created_at
    );
    setText(this.count, String(sandboxes.length));
    for (const [id, card] of this.cards) {
      if (!this.sandboxes.has(id)) {
        card.node.remove();
        this.cards.delete(id);
      }
    }
    const nodes: Element[] = sandboxes.map(sandbox => {
      let card = this.cards.get(sandbox.id);
      if (!card) {
        card = this.card(sandbox);
        this.cards.set(sandbox.id, card);
      }
      this.fill(card, sandbox);
      return card.node;
    });
    if (!nodes.length) {
      nodes.push(this.empty);
    }
    this.empty.remove();
    nodes.forEach((node, i) => {
      const current = this.list.children[i] ?? null;
      if (current !== node) {
        this.list.insertBefore(node, current);
      }
    });
  }

  /** Refresh the countdowns without waiting for the next message. */
  private tick(): void {
    for (const [id, card] of this.cards) {
      const sandbox = this.sandboxes.get(id);
      if (sandbox) {
        setText(card.left, timeLeft(sandbox));
      }
    }
  }

  /** A new card; `fill` fills it in. */
  private card(sandbox: ISandbox): ICard {
    const { id } = sandbox;
    const span = (cls: string) => h('span', { class: cls });
    const card: ICard = {
      node: h('section', { class: 'jsb-sandbox', 'data-id': id }),
      name: h('strong', { class: 'jsb-name' }),
      status: span('jsb-status'),
      failure: h('div', { class: 'jsb-failure', role: 'status' }),
      owner: h('div', { class: 'jsb-owner' }),
      left: h('span', { class: 'jsb-left', 'data-id': id }),
      limits: span('jsb-limits'),
      labels: h('div', { class: 'jsb-labels' }),
      usage: h('div', { class: 'jsb-usage' }),
      cpu: span('jsb-cpu'),
      cpuChart: sparkline('jsb-chart-cpu'),
      memory: span('jsb-memory'),
      memoryChart: sparkline('jsb-chart-memory'),
      ssh: h('input', { class: 'jsb-ssh', readonly: '' }),
      tunnel: h('input', { class: 'jsb-tunnel', readonly: '' })
    };
    card.node.append(
      h(
        'div',
        { class: 'jsb-title' },
        card.name,
        h('span', { class: 'jsb-id' }, id),
        card.status
      ),
      card.failure,
      card.owner,
      h('div', { class: 'jsb-meta' }, card.left, card.limits),
      card.labels,
      card.usage,
      this.actions(id)
    );
    card.usage.append(card.cpu, card.cpuChart, card.memory, card.memoryChart);
    return card;
  }

  private fill(card: ICard, sandbox: ISandbox): void {
    const { id, limits, usage } = sandbox;
    const samples = this.history.get(id) ?? [];
    const memoryMax = limits.memory || Math.max(...samples.map(s => s.memory), 64 << 20);
    const cpuMax = 100 * (limits.cpus || 1);
    const kernel = sandbox.labels.kernel;
    const owner =
      sandbox.notebook || (kernel ? `kernel ${kernel.slice(0, 8)}` : sandbox.owner);
    const limitText = [
      limits.memory ? `mem ${formatBytes(limits.memory)}` : '',
      limits.cpus ? `${limits.cpus} CPU` : '',
      limits.pids ? `${limits.pids} pids` : '',
      sandbox.network === 'host' ? 'network' : ''
    ].filter(Boolean);
    setAttr(card.node, 'data-status', sandbox.status);
    setText(card.name, sandbox.name);
    setAttr(card.status, 'class', `jsb-status jsb-status-${sandbox.status}`);
    setText(card.status, sandbox.status);
    const failed = sandbox.status === 'failed';
    setText(card.failure, failed ? (sandbox.failure ?? 'failed') : '');
    card.failure.hidden = !failed;
    card.usage.hidden = failed; // no processes to measure
    for (const button of card.node.querySelectorAll<HTMLButtonElement>('.jsb-action')) {
      const action = button.dataset.action ?? '';
      if (action === 'restart') {
        button.hidden = !failed;
      } else if (LIVE_ACTIONS.has(action)) {
        button.disabled = failed;
      }
    }
    setAttr(card.owner, 'title', sandbox.owner);
    setText(card.owner, owner);
    setText(card.left, timeLeft(sandbox));
    setAttr(card.limits, 'title', sandbox.limits_note ?? '');
    setText(card.limits, limitText.join(' · ') || 'no limits');
    const labels = Object.entries(sandbox.labels).map(([k, v]) => `${k}=${v}`);
    if (
      labels.join('\n') !== [...card.labels.children].map(l => l.textContent).join('\n')
    ) {
      card.labels.replaceChildren(
        ...labels.map(text => h('span', { class: 'jsb-label' }, text))
      );
    }
    setText(card.cpu, `CPU ${Math.round(usage?.cpu_percent ?? 0)}%`);
    plot(
      card.cpuChart,
      samples.map(s => s.cpu),
      cpuMax
    );
    setText(card.memory, formatBytes(usage?.memory_bytes ?? 0));
    plot(
      card.memoryChart,
      samples.map(s => s.memory),
      memoryMax
    );
    const access = this.accesses.get(id);
    if (access) {
      setValue(card.ssh, access.command);
      setValue(card.tunnel, tunnelCommand(access));
    }
    place(card.node, card.ssh, !!access);
    place(card.node, card.tunnel, !!access);
    const log = this.logViews.get(id);
    for (const view of card.node.querySelectorAll('.jsb-logs')) {
      if (view !== log) {
        view.remove();
      }
    }
    if (log && card.node.lastElementChild !== log) {
      card.node.append(log); // below the SSH commands
    }
  }

  private actions(id: string): HTMLElement {
    const button = (
      action: string,
      label: string,
      title: string,
      run: () => Promise<void>
    ) => {
      const node = h(
        'button',
        { class: 'jp-Button jsb-action', 'data-action': action, title },
        label
      );
      node.onclick = () => void this.act(title, run);
      return node;
    };
    // The card outlives updates: look the sandbox up when a button is pressed.
    const current = () => this.sandboxes.get(id) as ISandbox;
    return h(
      'div',
      { class: 'jsb-actions' },
      button('copy-ssh', 'SSH', 'Copy the SSH command', () => this.copySsh(id, false)),
      button(
        'copy-tunnel',
        'SSH via Jupyter',
        'Copy the SSH command through this server',
        () => this.copySsh(id, true)
      ),
      button('terminal', 'Terminal', 'Open a terminal in the sandbox', async () => {
        const { name } = await request<{ name: string }>('POST', [
          'sandboxes',
          id,
          'terminal'
        ]);
        await this.openTerminal(name);
      }),
      button('logs', 'Logs', 'Show or hide live logs', async () => this.toggleLogs(id)),
      button('extend', 'Extend', 'Set a new deadline', () => this.extend(current())),
      button('revoke', 'Revoke SSH', 'Revoke all SSH access', async () => {
        await request('DELETE', ['sandboxes', id, 'ssh']);
        this.accesses.delete(id);
        this.render();
      }),
      button(
        'restart',
        'Restart',
        'Start the failed sandbox again, with its files',
        async () => {
          const info = await request<ISandbox>('POST', ['sandboxes', id, 'restart']);
          this.onFeed({ type: 'updated', sandbox: info });
        }
      ),
      button('kill', 'Kill', 'Kill the sandbox', () => this.kill(current()))
    );
  }

  private async copySsh(id: string, tunnel: boolean): Promise<void> {
    const access = await request<ISshAccess>('POST', ['sandboxes', id, 'ssh']);
    this.accesses.set(id, access);
    Clipboard.copyToSystem(tunnel ? tunnelCommand(access) : access.command);
    this.render();
  }

  private async extend(sandbox: ISandbox): Promise<void> {
    const answer = await InputDialog.getText({
      title: `Extend ${sandbox.name}`,
      label: 'New deadline from now (e.g. 30m, 2h)',
      text: '30m'
    });
    if (answer.button.accept && answer.value) {
      const info = await request<ISandbox>('POST', ['sandboxes', sandbox.id, 'timeout'], {
        timeout: answer.value
      });
      this.onFeed({ type: 'updated', sandbox: info });
    }
  }

  private async kill(sandbox: ISandbox): Promise<void> {
    const answer = await showDialog({
      title: `Kill ${sandbox.name}?`,
      body: 'Its processes and files are gone for good.',
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Kill' })]
    });
    if (answer.button.accept) {
      await request('DELETE', ['sandboxes', sandbox.id]);
    }
  }

  private forget(id: string): void {
    this.sandboxes.delete(id);
    this.history.delete(id);
    this.accesses.delete(id);
    this.closeLogs(id);
  }

  private closeLogs(id: string): void {
    this.logs.get(id)?.close();
    this.logs.delete(id);
    this.logViews.delete(id);
  }

  private toggleLogs(id: string): void {
    if (this.logs.has(id)) {
      this.closeLogs(id);
      this.render();
      return;
    }
    const view = h('pre', { class: 'jsb-logs' });
    const socket = openSocket(['sandboxes', id, 'logs']);
    socket.onmessage = event => {
      const entry = JSON.parse(event.data) as ILogEntry & { message?: string };
      const where =
        entry.stream === 'event' ? entry.source : `${entry.source}:${entry.stream}`;
      view.append(entry.message ?? `[${where}] ${entry.text.replace(/\n$/, '')}\n`);
      view.scrollTop = view.scrollHeight;
    };
    this.logs.set(id, socket);
    this.logViews.set(id, view);
    this.render();
  }

  private async act(what: string, run: () => Promise<void>): Promise<void> {
    try {
      await run();
    } catch (error) {
      await showErrorMessage(what, error as Error);
    }
  }

  private readonly openTerminal: OpenTerminal;
  private readonly clock: number;
  private readonly count = h('span', { class: 'jsb-count' }, '0');
  private readonly form = this.buildForm();
  private readonly list = h('div', { class: 'jsb-list' });
  private readonly empty = h(
    'p',
    { class: 'jsb-empty' },
    'No sandboxes. Create one here or with %%sandbox.'
  );
  private readonly cards = new Map<string, ICard>();
  private socket: WebSocket | null = null;
  private sandboxes = new Map<string, ISandbox>();
  private readonly history = new Map<string, ISample[]>();
  private readonly accesses = new Map<string, ISshAccess>();
  private readonly logs = new Map<string, WebSocket>();
  private readonly logViews = new Map<string, HTMLPreElement>();
}
