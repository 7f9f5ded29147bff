/**
 * A sandbox's live log, every line with its time and source: inside a card, or in a
 * main-area tab of its own ("open in a tab").
 */
import { MainAreaWidget } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { ILogEntry, openSocket } from './api';
import { h } from './dom';
import { formatClock } from './format';

const MAX_LINES = 5000;

/** The log lines of one sandbox, followed over a websocket until closed. */
export class LogView {
  readonly node: HTMLElement;

  constructor(
    readonly sandboxId: string,
    cls = ''
  ) {
    this.node = h('div', {
      class: `jsb-logs ${cls}`.trim(),
      role: 'log',
      'aria-live': 'off',
      tabindex: '0'
    });
    this.open();
  }

  close(): void {
    this.socket?.close();
  }

  private open(): void {
    const socket = openSocket(['sandboxes', this.sandboxId, 'logs']);
    this.socket = socket;
    socket.onmessage = event =>
      this.add(JSON.parse(event.data) as ILogEntry & { message?: string });
  }

  private add(entry: ILogEntry & { message?: string }): void {
    if (entry.message !== undefined) {
      this.node.append(h('div', { class: 'jsb-log-line jsb-log-error' }, entry.message));
      return;
    }
    // The service's audit entries are numbered apart from the sandbox's own.
    const last = this.lastSeq.get(entry.stream === 'audit');
    if (last !== undefined && entry.seq <= last) {
      return;
    }
    this.lastSeq.set(entry.stream === 'audit', entry.seq);
    const where =
      entry.stream === 'audit'
        ? 'service'
        : entry.stream === 'event'
          ? entry.source
          : `${entry.source}:${entry.stream}`;
    const follow =
      this.node.scrollTop + this.node.clientHeight >= this.node.scrollHeight - 4;
    this.node.append(
      h(
        'div',
        { class: `jsb-log-line jsb-log-${entry.stream}` },
        h(
          'time',
          { datetime: new Date(entry.time * 1000).toISOString() },
          formatClock(entry.time)
        ),
        ' ',
        h('span', { class: 'jsb-log-source' }, `[${where}]`),
        ' ',
        // A line break inside an entry (a command's) is shown as \x0a: no text can
        // start a line of its own and pass for a note of the service.
        entry.text
          .replace(/\n$/, '')
          .replace(/[\r\n]/g, c => `\\x0${c.charCodeAt(0).toString(16)}`)
      )
    );
    while (this.node.childElementCount > MAX_LINES) {
      this.node.firstElementChild!.remove();
    }
    if (follow) {
      this.node.scrollTop = this.node.scrollHeight;
    }
  }

  private socket: WebSocket | null = null;
  private lastSeq = new Map<boolean, number>();
}

/** A main-area tab following a sandbox's log; it stops following when closed. */
export function logTab(sandboxId: string, name: string): MainAreaWidget {
  const view = new LogView(sandboxId, 'jsb-logs-tab');
  const content = new Widget({ node: view.node });
  content.disposed.connect(() => view.close());
  const widget = new MainAreaWidget({ content });
  widget.id = `jupyter-sandbox-logs-${sandboxId}`;
  widget.title.label = `Logs: ${name}`;
  widget.title.caption = `Live log of sandbox ${name} (${sandboxId})`;
  widget.title.closable = true;
  widget.addClass('jsb-LogTab');
  return widget;
}
