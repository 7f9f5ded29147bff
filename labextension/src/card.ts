/**
 * A sandbox's card: its state, owner, time left, limits, labels, live charts, actions,
 * SSH commands and log. Built once per sandbox and updated in place.
 */
import {
  addIcon,
  closeIcon,
  copyIcon,
  launchIcon,
  listIcon,
  refreshIcon,
  terminalIcon
} from '@jupyterlab/ui-components';

import { ISandbox, ISshCommand } from './api';
import { Chart, HISTORY, IPoint } from './chart';
import { button, h, place, setAttr, setText, setValue } from './dom';
import {
  displayName,
  FILES_LOST,
  filesKept,
  formatBytes,
  formatPercent,
  remaining,
  visibleLabels
} from './format';
import { LogView } from './logs';

/** Actions that need the sandbox's processes: off while it is failed. */
export const LIVE_ACTIONS = new Set(['copy-ssh', 'copy-tunnel', 'terminal', 'revoke']);

/** The facts list of a card, in order: class suffix and label. */
const FACTS = [
  ['owner', 'Owner'],
  ['user', 'User'],
  ['left', 'Time left'],
  ['limits', 'Limits'],
  ['labels', 'Labels']
];

export interface ISample {
  time: number;
  cpu: number;
  memory: number;
}

/** What a card shows besides the sandbox itself. */
export interface ICardContext {
  owner: string;
  /** The OS user, when sandboxes of several users are shown (system mode). */
  user: string | null;
  samples: ISample[];
  ssh: ISshCommand | null;
  tunnel: ISshCommand | null;
  log: LogView | null;
  note: string;
}

/** Runs a card's action by name (`data-action`) for sandbox `id`. */
export type Act = (action: string, id: string) => void;

export function limitsText(sandbox: ISandbox): string {
  const { limits } = sandbox;
  return (
    [
      limits.memory ? `${formatBytes(limits.memory)} memory` : '',
      limits.cpus ? `${limits.cpus} CPU${limits.cpus === 1 ? '' : 's'}` : '',
      limits.pids ? `${limits.pids} processes` : '',
      sandbox.network === 'host' ? 'host network' : ''
    ]
      .filter(Boolean)
      .join(' · ') || 'no limits'
  );
}

/** The scale of the CPU chart: at least its CPU limit (100% a core), or what it used. */
export function cpuScale(sandbox: ISandbox, samples: ISample[]): number {
  const peak = Math.max(0, ...samples.map(s => s.cpu));
  const limit = 100 * Math.max(1, Math.ceil(sandbox.limits.cpus || 1));
  return Math.max(limit, Math.ceil(peak / 100) * 100);
}

/** The scale of the memory chart: its limit, or a little above its peak. */
export function memoryScale(sandbox: ISandbox, samples: ISample[]): number {
  if (sandbox.limits.memory) {
    return sandbox.limits.memory;
  }
  const peak = Math.max(64 << 20, ...samples.map(s => s.memory));
  return 2 ** Math.ceil(Math.log2(peak));
}

class CopyField {
  readonly node: HTMLElement;
  copied = '';

  constructor(cls: string, label: string, act: () => void) {
    this.input = h('input', {
      class: `jp-mod-styled jsb-copy-field ${cls}`,
      readonly: '',
      'aria-label': label
    });
    this.node = h(
      'div',
      { class: 'jsb-copy' },
      h('span', { class: 'jsb-copy-label' }, label),
      ' ',
      this.input,
      ' ',
      button(
        '',
        { 'aria-label': `Copy: ${label}`, title: 'Copy', class: 'jsb-copy-button' },
        copyIcon,
        act
      )
    );
  }

  set(command: ISshCommand): void {
    this.copied = command.copied;
    setValue(this.input, command.shown);
    setAttr(
      this.input,
      'title',
      `${command.shown}\nCopy writes the credentials into 0600 files first, so no token ` +
        'is on screen or in the command line.'
    );
  }

  private readonly input: HTMLInputElement;
}

export class Card {
  readonly node: HTMLElement;

  constructor(
    readonly id: string,
    act: Act
  ) {
    const action = (name: string, label: string, title: string, icon?: typeof addIcon) =>
      button(
        label,
        { class: 'jsb-action', 'data-action': name, title, 'aria-label': title },
        icon,
        () => act(name, id)
      );
    this.ssh = new CopyField('jsb-ssh', 'SSH', () => act('copy-ssh-again', id));
    this.tunnel = new CopyField('jsb-tunnel', 'SSH via Jupyter', () =>
      act('copy-tunnel-again', id)
    );
    this.node = h(
      'section',
      { class: 'jsb-sandbox', 'data-id': id, 'aria-label': `Sandbox ${id}` },
      h('header', { class: 'jsb-title' }, this.name, ' ', this.status),
      h('div', { class: 'jsb-id' }, id),
      this.failure,
      this.facts,
      this.recording,
      this.usage,
      h(
        'div',
        { class: 'jsb-actions' },
        action('copy-ssh', 'SSH', 'Copy an SSH command'),
        action(
          'copy-tunnel',
          'SSH via Jupyter',
          'Copy an SSH command through this server'
        ),
        action('terminal', 'Terminal', 'Open a terminal in the sandbox', terminalIcon),
        action('logs', 'Logs', 'Show or hide the live log here', listIcon),
        action('logs-tab', 'Log tab', 'Open the live log in a tab', launchIcon),
        action('extend', 'Extend', 'Add time before it ends', addIcon),
        action('revoke', 'Revoke SSH', 'Revoke all SSH access'),
        action(
          'restart',
          'Restart',
          'Start the failed sandbox again, with its files',
          refreshIcon
        ),
        action('kill', 'Kill', 'Kill the sandbox', closeIcon)
      ),
      this.note
    );
    this.failure.hidden = true;
    for (const [key, label] of FACTS) {
      const dt = h('dt', {}, `${label}:`);
      const dd = h('dd', { class: `jsb-${key}` });
      this.factNodes.set(key, [dt, dd]);
      this.facts.append(dt, ' ', dd, '\n');
    }
    this.cpu = new Chart('CPU', 'cpu', formatPercent);
    this.memory = new Chart('Memory', 'memory', formatBytes);
    this.usage.append(this.cpu.node, this.memory.node);
    this.recording.append(
      'Terminal sessions are recorded; whoever may see this sandbox can replay them. ',
      button(
        'Replay',
        { 'data-action': 'recordings', class: 'jsb-action' },
        undefined,
        () => act('recordings', id)
      )
    );
  }

  fill(sandbox: ISandbox, context: ICardContext): void {
    const failed = sandbox.status === 'failed';
    setAttr(this.node, 'data-status', sandbox.status);
    setText(this.name, displayName(sandbox));
    setAttr(this.name, 'title', `service name: ${sandbox.name}`);
    setAttr(this.status, 'class', `jsb-status jsb-status-${sandbox.status}`);
    setText(this.status, sandbox.status);
    const lost = failed && !filesKept(sandbox);
    const why = sandbox.failure ?? 'failed';
    setText(this.failure, !failed ? '' : lost ? `${why}. ${FILES_LOST}` : why);
    this.failure.hidden = !failed;
    this.fact('owner', context.owner, sandbox.owner);
    this.fact('user', context.user);
    this.fact('left', remaining(sandbox));
    this.fact('limits', limitsText(sandbox), sandbox.limits_note ?? '');
    this.labels(visibleLabels(sandbox));
    this.recording.hidden = !sandbox.recording;
    this.usage.hidden = failed; // no processes to measure
    for (const node of this.node.querySelectorAll<HTMLButtonElement>('.jsb-action')) {
      const name = node.dataset.action ?? '';
      if (name === 'restart') {
        node.hidden = !failed;
        const title = lost
          ? 'Start the failed sandbox again, with an empty home: its files are not kept'
          : 'Start the failed sandbox again, with its files';
        setAttr(node, 'title', title);
        setAttr(node, 'aria-label', title);
      } else if (LIVE_ACTIONS.has(name)) {
        node.disabled = failed;
      }
    }
    const usage = sandbox.usage;
    // Before the first sample, the usage the sandbox came with is the first point, so
    // the caption's value is always on its chart; with neither, the caption says none.
    const samples =
      context.samples.length || !usage
        ? context.samples
        : [
            {
              time: Date.now() / 1000,
              cpu: usage.cpu_percent ?? 0,
              memory: usage.memory_bytes ?? 0
            }
          ];
    const measured = samples.length > 0;
    const cpuMax = cpuScale(sandbox, samples);
    this.cpu.update(
      points(samples, s => s.cpu),
      cpuMax,
      `CPU ${measured ? formatPercent(usage?.cpu_percent ?? 0) : '–'} (100% = one core)`
    );
    const memoryMax = memoryScale(sandbox, samples);
    this.memory.update(
      points(samples, s => s.memory),
      memoryMax,
      `Memory ${measured ? formatBytes(usage?.memory_bytes ?? 0) : '–'} of ${
        sandbox.limits.memory
          ? formatBytes(memoryMax)
          : `${formatBytes(memoryMax)} (no limit)`
      }`
    );
    if (context.ssh) {
      this.ssh.set(context.ssh);
    }
    if (context.tunnel) {
      this.tunnel.set(context.tunnel);
    }
    place(this.node, this.ssh.node, !!context.ssh);
    place(this.node, this.tunnel.node, !!context.tunnel);
    for (const view of this.node.querySelectorAll(':scope > .jsb-logs')) {
      if (view !== context.log?.node) {
        view.remove();
      }
    }
    if (context.log && this.node.lastElementChild !== context.log.node) {
      this.node.append(context.log.node); // below the SSH commands
    }
    setText(this.note, context.note);
    this.note.hidden = !context.note;
  }

  /** The countdown, every second. */
  tick(sandbox: ISandbox): void {
    this.fact('left', remaining(sandbox));
  }

  /** The full command of a copy field, for Copy. */
  copied(tunnel: boolean): string {
    return (tunnel ? this.tunnel : this.ssh).copied;
  }

  /** A "label: value" line of the facts list; `value` null hides it. */
  private fact(key: string, value: string | null, title = ''): void {
    const [dt, dd] = this.factNodes.get(key)!;
    dt.hidden = dd.hidden = value === null;
    setText(dd, value ?? '');
    setAttr(dd, 'title', title);
  }

  private labels(labels: string[]): void {
    const [dt, dd] = this.factNodes.get('labels')!;
    const shown = [...dd.children].map(l => l.textContent).join('\n');
    if (labels.join('\n') !== shown) {
      dd.replaceChildren(
        ...labels.flatMap((text, i) => [
          ...(i ? [' '] : []),
          h('span', { class: 'jsb-label' }, text)
        ])
      );
    }
    dt.hidden = dd.hidden = !labels.length;
  }

  private readonly name = h('strong', { class: 'jsb-name' });
  private readonly status = h('span', { class: 'jsb-status' });
  private readonly failure = h('div', { class: 'jsb-failure', role: 'status' });
  private readonly facts = h('dl', { class: 'jsb-facts' });
  private readonly factNodes = new Map<string, [HTMLElement, HTMLElement]>();
  private readonly recording = h('p', { class: 'jsb-recording', role: 'note' });
  private readonly usage = h('div', { class: 'jsb-usage' });
  private readonly note = h('p', { class: 'jsb-note', role: 'status' });
  private readonly cpu: Chart;
  private readonly memory: Chart;
  private readonly ssh: CopyField;
  private readonly tunnel: CopyField;
}

function points(samples: ISample[], value: (s: ISample) => number): IPoint[] {
  return samples.slice(-HISTORY).map(s => ({ time: s.time, value: value(s) }));
}
