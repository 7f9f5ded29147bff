/**
 * The "Sandboxes" side panel: every sandbox as a card or a row of a table, with search,
 * filters, sorting, grouping, bulk actions, the user's quota, live charts and logs.
 */
import {
  Clipboard,
  Dialog,
  InputDialog,
  MainAreaWidget,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { Session } from '@jupyterlab/services';
import { IStateDB } from '@jupyterlab/statedb';
import {
  addIcon,
  closeIcon,
  listIcon,
  searchIcon,
  tableRowsIcon,
  Toolbar,
  ToolbarButton
} from '@jupyterlab/ui-components';
import { Panel, Widget } from '@lumino/widgets';

import {
  FeedMessage,
  ICreateOptions,
  IQuotaUsage,
  ISandbox,
  ISshAccess,
  ISshCommand,
  IUsage,
  openSocket,
  request,
  sshCommand
} from './api';
import { Card, ISample } from './card';
import { HISTORY } from './chart';
import { arrange, button, h, setText } from './dom';
import {
  displayName,
  displayOwner,
  formatBytes,
  formatDuration,
  formatPercent,
  remaining,
  secondsLeft,
  timeLeft,
  visibleLabels
} from './format';
import { LogView, logTab } from './logs';
import { recordingsTab } from './player';
import { COLUMNS, IGroup, IRowData, SortKey, Table } from './table';

const RECONNECT_MS = 2000;
const NOTE_MS = 15000;
const STATE_KEY = 'jupyter-sandbox:panel';
const BULK_NAMES_SHOWN = 12;

export type View = 'cards' | 'table';
export type Grouping = 'none' | 'owner' | 'label';

/** What the panel remembers between sessions (in JupyterLab's state database). */
interface IViewState {
  view: View;
  sort: SortKey | 'created';
  descending: boolean;
  group: Grouping;
}

const DEFAULT_STATE: IViewState = {
  view: 'cards',
  sort: 'created',
  descending: true,
  group: 'none'
};

export interface IPanelOptions {
  /** Open a JupyterLab terminal by its name, titled `label`. */
  openTerminal: (name: string, label: string) => Promise<void>;
  /** Show a main-area tab (a live log, recordings), or bring its twin forward. */
  openTab: (widget: MainAreaWidget) => void;
  /** The live kernel sessions: a sandbox's notebook is looked up there. */
  sessions: Session.IManager;
  state: IStateDB | null;
}

export class SandboxPanel extends Panel {
  constructor(private readonly options: IPanelOptions) {
    super();
    this.id = 'jupyter-sandbox-panel';
    this.addClass('jsb-Panel');
    this.title.caption = 'Sandboxes';
    this.addWidget(this.buildHeader());
    this.addWidget(new Widget({ node: this.controls() }));
    this.addWidget(new Widget({ node: this.quota }));
    this.addWidget(new Widget({ node: this.bulk }));
    const body = new Widget({ node: this.body });
    body.addClass('jsb-body-widget');
    this.addWidget(body);
    this.body.append(this.form, this.list, this.table.node, this.empty);
    this.form.hidden = true;
    this.quota.hidden = true;
    options.sessions.runningChanged.connect(this.onSessions, this);
    this.onSessions();
    void this.restoreState();
    this.connect();
    this.clock = window.setInterval(() => this.tick(), 1000);
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    window.clearInterval(this.clock);
    this.options.sessions.runningChanged.disconnect(this.onSessions, this);
    this.socket?.close();
    this.logs.forEach(view => view.close());
    super.dispose();
  }

  // -- layout ------------------------------------------------------------------------------

  /** The heading, and a toolbar: New, and the two views. */
  private buildHeader(): Panel {
    const header = new Panel();
    header.addClass('jsb-header');
    header.addWidget(
      new Widget({
        node: h(
          'div',
          { class: 'jsb-heading' },
          h('h2', {}, 'Sandboxes'),
          ' ',
          this.count
        )
      })
    );
    const toolbar = new Toolbar();
    toolbar.addClass('jsb-toolbar');
    toolbar.addItem(
      'new',
      new ToolbarButton({
        icon: addIcon,
        tooltip: 'New sandbox',
        dataset: { action: 'new' },
        onClick: () => {
          this.form.hidden = !this.form.hidden;
          if (!this.form.hidden) {
            this.body.scrollTop = 0;
          }
        }
      })
    );
    for (const [view, label, icon] of [
      ['cards', 'Cards', listIcon],
      ['table', 'Table', tableRowsIcon]
    ] as const) {
      const toggle = new ToolbarButton({
        icon,
        tooltip: `${label}: show the sandboxes as ${view}`,
        dataset: { view },
        pressed: this.state.view === view,
        onClick: () => this.setState({ view })
      });
      this.viewButtons.set(view, toggle);
      toolbar.addItem(`view-${view}`, toggle);
    }
    header.addWidget(toolbar);
    return header;
  }

  private controls(): HTMLElement {
    this.search.oninput = () => this.schedule();
    const select = (name: string, label: string, onChange: () => void) => {
      const node = h('select', {
        class: 'jp-mod-styled jsb-select-filter',
        'data-filter': name,
        'aria-label': label
      });
      node.onchange = onChange;
      this.filters.set(name, node);
      return h('span', { class: `jsb-filter jsb-filter-${name}` }, node);
    };
    const filters = ['status', 'user', 'label'].map(name =>
      select(name, name[0].toUpperCase() + name.slice(1), () => this.schedule())
    );
    const group = select('group', 'Group', () =>
      this.setState({ group: this.filters.get('group')!.value as Grouping })
    );
    const sort = select('sort', 'Sort', () => {
      const [key, dir] = this.filters.get('sort')!.value.split(':');
      this.setState({ sort: key as SortKey, descending: dir === 'desc' });
    });
    this.options_(this.filters.get('group')!, [
      ['none', 'no grouping'],
      ['owner', 'group by owner'],
      ['label', 'group by label']
    ]);
    this.options_(this.filters.get('sort')!, [
      ['created:desc', 'newest first'],
      ...COLUMNS.flatMap(([key, label]): [string, string][] => [
        [`${key}:asc`, `by ${label.toLowerCase()} ↑`],
        [`${key}:desc`, `by ${label.toLowerCase()} ↓`]
      ])
    ]);
    return h(
      'div',
      { class: 'jsb-controls' },
      h(
        'div',
        { class: 'jp-InputGroup jsb-search' },
        this.search,
        h(
          'span',
          { class: 'jp-InputGroupAction' },
          searchIcon.element({ tag: 'span', elementSize: 'small' })
        )
      ),
      h('div', { class: 'jsb-filters' }, ...filters, group, sort)
    );
  }

  /** Replace `select`'s options (value, text) if they differ; keeps the choice if it can. */
  private options_(select: HTMLSelectElement, options: [string, string][]): void {
    const now = [...select.options].map(o => `${o.value}\u0000${o.text}`).join('\n');
    if (now === options.map(([v, t]) => `${v}\u0000${t}`).join('\n')) {
      return;
    }
    const value = select.value;
    select.replaceChildren(...options.map(([v, t]) => h('option', { value: v }, t)));
    select.value = options.some(([v]) => v === value) ? value : options[0][0];
  }

  private buildForm(): HTMLFormElement {
    const field = (label: string, name: string, placeholder = '', value = '') =>
      h(
        'label',
        {},
        label,
        h('input', { class: 'jp-mod-styled', name, placeholder, value })
      );
    const network = h(
      'select',
      { name: 'network', class: 'jp-mod-styled' },
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
        h('input', {
          class: 'jp-mod-styled',
          name: 'image',
          placeholder: 'e.g. course/image'
        })
      ),
      h(
        'label',
        {},
        'Environment',
        h('textarea', {
          name: 'env',
          class: 'jp-mod-styled',
          placeholder: 'KEY=value per line'
        })
      ),
      h(
        'button',
        { class: 'jp-Button jp-mod-styled jp-mod-accept', type: 'submit' },
        'Create'
      )
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
      void this.guard('Create sandbox', async () => {
        await request('POST', ['sandboxes'], options);
        form.hidden = true;
      });
    };
    return form;
  }

  // -- state -------------------------------------------------------------------------------

  private async restoreState(): Promise<void> {
    const saved = (await this.options.state?.fetch(STATE_KEY)) as
      Partial<IViewState> | undefined;
    if (saved) {
      this.state = { ...DEFAULT_STATE, ...saved };
      this.schedule();
    }
  }

  private setState(change: Partial<IViewState>): void {
    this.state = { ...this.state, ...change };
    void this.options.state?.save(STATE_KEY, { ...this.state });
    this.schedule();
  }

  // -- the feed ----------------------------------------------------------------------------

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
        for (const id of this.sandboxes.keys()) {
          if (!message.sandboxes.some(s => s.id === id)) {
            this.forget(id);
          }
        }
        this.sandboxes = new Map(message.sandboxes.map(s => [s.id, s]));
        void this.refreshQuota();
        break;
      case 'created':
      case 'updated':
        this.sandboxes.set(message.sandbox.id, {
          ...this.sandboxes.get(message.sandbox.id),
          ...message.sandbox
        });
        if (message.type === 'created') {
          void this.refreshQuota();
        }
        break;
      case 'ended':
        this.forget(message.sandbox.id);
        void this.refreshQuota();
        break;
      case 'usage':
        this.record(message.time, message.usage);
        break;
    }
    this.schedule();
  }

  private record(time: number, usage: Record<string, IUsage | null>): void {
    for (const [id, sample] of Object.entries(usage)) {
      const sandbox = this.sandboxes.get(id);
      if (!sandbox) {
        continue;
      }
      sandbox.usage = sample;
      const samples = this.history.get(id) ?? [];
      samples.push({
        time,
        cpu: sample?.cpu_percent ?? 0,
        memory: sample?.memory_bytes ?? 0
      });
      this.history.set(id, samples.slice(-HISTORY));
    }
  }

  private onSessions(): void {
    this.notebooks = new Map(
      [...this.options.sessions.running()]
        .filter(s => s.kernel)
        .map(s => [s.kernel!.id, s.path])
    );
    this.schedule();
  }

  private async refreshQuota(): Promise<void> {
    try {
      this.usage = await request<IQuotaUsage>('GET', ['usage']);
    } catch {
      this.usage = null; // a server extension from before quotas: no block
    }
    this.renderQuota();
  }

  // -- rendering ---------------------------------------------------------------------------

  /** Render once, soon: a burst of messages costs one pass. */
  private schedule(): void {
    if (this.pending === null) {
      this.pending = window.requestAnimationFrame(() => {
        this.pending = null;
        this.render();
      });
    }
  }

  /** Whether sandboxes of several OS users are shown (system mode). */
  private isSystemMode(): boolean {
    if (this.usage?.mode === 'system') {
      return true;
    }
    const users = new Set([...this.sandboxes.values()].map(s => s.user).filter(Boolean));
    return users.size > 1;
  }

  private rowData(sandbox: ISandbox): IRowData {
    const usage = sandbox.usage;
    const owner = displayOwner(sandbox, this.notebooks);
    const labels = visibleLabels(sandbox).join(' ');
    const cpu = usage?.cpu_percent ?? null;
    const memory = usage?.memory_bytes ?? null;
    return {
      sandbox,
      text: {
        name: displayName(sandbox),
        status: sandbox.status,
        user: sandbox.user ?? '',
        owner,
        left: remaining(sandbox),
        cpu: cpu === null ? '–' : formatPercent(cpu),
        memory:
          memory === null
            ? '–'
            : sandbox.limits.memory
              ? `${formatBytes(memory)} / ${formatBytes(sandbox.limits.memory)}`
              : formatBytes(memory),
        labels
      },
      sortValue: {
        name: displayName(sandbox).toLowerCase(),
        status: sandbox.status,
        user: sandbox.user ?? '',
        owner: owner.toLowerCase(),
        left: secondsLeft(sandbox),
        cpu: cpu ?? -1,
        memory: memory ?? -1,
        labels
      }
    };
  }

  /** The sandboxes the search and filters let through, sorted. */
  private shown(): IRowData[] {
    const words = this.search.value.toLowerCase().split(/\s+/).filter(Boolean);
    const status = this.filters.get('status')!.value;
    const user = this.filters.get('user')!.value;
    const label = this.filters.get('label')!.value;
    const rows = [...this.sandboxes.values()].map(s => this.rowData(s));
    const matching = rows.filter(({ sandbox, text }) => {
      if ((status && sandbox.status !== status) || (user && sandbox.user !== user)) {
        return false;
      }
      if (label && !visibleLabels(sandbox).includes(label)) {
        return false;
      }
      const haystack = [
        text.name,
        sandbox.name,
        sandbox.id,
        text.user,
        text.owner,
        text.labels
      ]
        .join(' ')
        .toLowerCase();
      return words.every(word => haystack.includes(word));
    });
    const { sort, descending } = this.state;
    const sign = descending ? -1 : 1;
    return matching.sort((a, b) => {
      const x = sort === 'created' ? a.sandbox.created_at : a.sortValue[sort];
      const y = sort === 'created' ? b.sandbox.created_at : b.sortValue[sort];
      const order = x < y ? -1 : x > y ? 1 : 0;
      return sign * order || a.sandbox.id.localeCompare(b.sandbox.id);
    });
  }

  private groups(rows: IRowData[]): IGroup[] {
    const { group } = this.state;
    if (group === 'none') {
      return [{ key: '', label: '', rows }];
    }
    const byKey = new Map<string, IRowData[]>();
    for (const row of rows) {
      const key =
        group === 'owner'
          ? (this.system ? row.text.user : row.text.owner) || 'unknown owner'
          : row.text.labels || 'no labels';
      byKey.set(key, [...(byKey.get(key) ?? []), row]);
    }
    return [...byKey.keys()]
      .sort((a, b) => a.localeCompare(b))
      .map(key => ({ key: `${group}:${key}`, label: key, rows: byKey.get(key)! }));
  }

  private render(): void {
    if (this.isDisposed) {
      return;
    }
    const all = [...this.sandboxes.values()];
    setText(this.count, String(all.length));
    const system = (this.system = this.isSystemMode());
    this.node.classList.toggle('jsb-system', system);
    this.renderFilters(all, system);
    const rows = this.shown();
    const ids = new Set(rows.map(r => r.sandbox.id));
    for (const id of this.selected) {
      if (!ids.has(id)) {
        this.selected.delete(id); // a hidden sandbox is never acted on in bulk
      }
    }
    const table = this.state.view === 'table';
    for (const [view, toggle] of this.viewButtons) {
      toggle.pressed = this.state.view === view;
    }
    this.node.dataset.view = this.state.view;
    this.list.hidden = table;
    this.table.node.hidden = !table;
    this.empty.hidden = all.length > 0;
    this.filters.get('sort')!.value =
      `${this.state.sort}:${this.state.descending ? 'desc' : 'asc'}`;
    this.filters.get('group')!.value = this.state.group;
    if (table) {
      // Only the cards opened below their rows are kept up to date.
      const details = new Map(
        rows
          .filter(row => this.details.has(row.sandbox.id))
          .map(row => [row.sandbox.id, this.card(row).node])
      );
      this.table.update(
        this.groups(rows),
        {
          key: this.state.sort === 'created' ? ('' as SortKey) : this.state.sort,
          descending: this.state.descending
        },
        this.selected,
        system,
        details
      );
    } else {
      const nodes = rows.map(row => this.card(row).node);
      arrange(this.list, nodes.length || !all.length ? nodes : [this.noMatch]);
    }
    this.renderBulk(table);
  }

  /** The card of a shown sandbox, filled in (only shown ones are kept up to date). */
  private card(row: IRowData): Card {
    const { sandbox } = row;
    let card = this.cards.get(sandbox.id);
    if (!card) {
      card = new Card(sandbox.id, (action, id) => this.act(action, id));
      this.cards.set(sandbox.id, card);
    }
    card.fill(sandbox, {
      owner: row.text.owner,
      user: this.system ? row.text.user : null,
      samples: this.history.get(sandbox.id) ?? [],
      ssh: this.commands.get(`${sandbox.id}:ssh`) ?? null,
      tunnel: this.commands.get(`${sandbox.id}:tunnel`) ?? null,
      log: this.logs.get(sandbox.id) ?? null,
      note: this.notes.get(sandbox.id) ?? ''
    });
    return card;
  }

  private renderFilters(all: ISandbox[], system: boolean): void {
    const values = (pick: (s: ISandbox) => string[]) =>
      [...new Set(all.flatMap(pick))].sort((a, b) => a.localeCompare(b));
    const choices = (any: string, list: string[]): [string, string][] => [
      ['', any],
      ...list.map((v): [string, string] => [v, v])
    ];
    this.options_(
      this.filters.get('status')!,
      choices(
        'any status',
        values(s => [s.status])
      )
    );
    this.options_(
      this.filters.get('user')!,
      choices(
        'any user',
        values(s => (s.user ? [s.user] : []))
      )
    );
    this.options_(
      this.filters.get('label')!,
      choices('any label', values(visibleLabels))
    );
    this.filters.get('user')!.parentElement!.hidden = !system;
  }

  private renderBulk(table: boolean): void {
    const count = this.selected.size;
    this.bulk.hidden = !table || count === 0;
    setText(this.bulkCount, `${count} selected`);
  }

  private renderQuota(): void {
    const usage = this.usage;
    const quota = usage?.available ? (usage.quota ?? {}) : {};
    const used = usage?.usage ?? {};
    const limited = Object.values(quota).some(v => v !== null && v !== undefined);
    this.quota.hidden = !usage?.available || (!limited && !usage.instructor);
    if (this.quota.hidden) {
      return;
    }
    const items: [string, string, number, number | null][] = [
      ['sandboxes', 'Sandboxes', used.sandboxes ?? 0, quota.sandboxes ?? null],
      ['memory', 'Memory', used.memory ?? 0, quota.memory ?? null],
      ['cpus', 'CPUs', used.cpus ?? 0, quota.cpus ?? null]
    ];
    const show = (key: string, value: number) =>
      key === 'memory' ? formatBytes(value) : String(Math.round(value * 100) / 100);
    const rows = items
      .filter(([, , , limit]) => limit !== null)
      .map(([key, label, value, limit]) =>
        h(
          'div',
          { class: `jsb-quota-item jsb-quota-${key}` },
          h('span', { class: 'jsb-quota-label' }, `${label}:`),
          ' ',
          h(
            'span',
            {
              class: 'jsb-quota-value',
              title: usage!.source?.[key] ? `set by ${usage!.source[key]}` : ''
            },
            `${show(key, value)} of ${show(key, limit!)}`
          ),
          ' ',
          h('meter', {
            min: '0',
            max: String(limit),
            value: String(value),
            high: String(limit! * 0.8),
            'aria-label': `${label} used`
          })
        )
      );
    if (quota.lifetime) {
      rows.push(
        h(
          'div',
          { class: 'jsb-quota-item jsb-quota-lifetime' },
          h('span', { class: 'jsb-quota-label' }, 'Longest lifetime:'),
          ' ',
          h('span', { class: 'jsb-quota-value' }, formatDuration(quota.lifetime))
        )
      );
    }
    const who = usage!.instructor
      ? `${usage!.user} (instructor: sees every student's sandboxes)`
      : (usage!.user ?? '');
    this.quota.replaceChildren(
      h(
        'h3',
        {},
        'Your quota',
        ...(who ? [' · ', h('span', { class: 'jsb-quota-user' }, who)] : [])
      ),
      h('div', { class: 'jsb-quota-items' }, ...rows)
    );
  }

  /** Refresh the countdowns without waiting for the next message. */
  private tick(): void {
    for (const sandbox of this.sandboxes.values()) {
      this.table.tick(sandbox.id, remaining(sandbox)); // every row counts down alike
      const card = this.cards.get(sandbox.id);
      if (card?.node.isConnected) {
        card.tick(sandbox);
      }
    }
  }

  // -- actions -----------------------------------------------------------------------------

  private act(action: string, id: string): void {
    const sandbox = this.sandboxes.get(id);
    if (!sandbox) {
      return;
    }
    const name = displayName(sandbox);
    const run = (what: string, task: () => Promise<void>) => void this.guard(what, task);
    switch (action) {
      case 'copy-ssh':
      case 'copy-tunnel':
        run('Copy an SSH command', () => this.copySsh(id, action === 'copy-tunnel'));
        break;
      case 'copy-ssh-again':
      case 'copy-tunnel-again':
        Clipboard.copyToSystem(
          this.cards.get(id)!.copied(action === 'copy-tunnel-again')
        );
        break;
      case 'terminal':
        run('Open a terminal', async () => {
          const answer = await request<{ name: string }>('POST', [
            'sandboxes',
            id,
            'terminal'
          ]);
          await this.options.openTerminal(answer.name, `SSH: ${name}`);
        });
        break;
      case 'logs':
        this.toggleLogs(id);
        break;
      case 'logs-tab':
        this.options.openTab(logTab(id, name));
        break;
      case 'recordings':
        run('Replay recordings', async () =>
          this.options.openTab(await recordingsTab(id, name))
        );
        break;
      case 'extend':
        run('Extend', () => this.extend([sandbox]));
        break;
      case 'revoke':
        run('Revoke SSH', async () => {
          await request('DELETE', ['sandboxes', id, 'ssh']);
          this.commands.delete(`${id}:ssh`);
          this.commands.delete(`${id}:tunnel`);
          this.schedule();
        });
        break;
      case 'restart':
        run('Restart', async () => {
          const info = await request<ISandbox>('POST', ['sandboxes', id, 'restart']);
          this.onFeed({ type: 'updated', sandbox: info });
        });
        break;
      case 'kill':
        run('Kill', () => this.kill([sandbox]));
        break;
      case 'details':
        if (!this.details.delete(id)) {
          this.details.add(id);
        }
        this.schedule();
        break;
    }
  }

  private async copySsh(id: string, tunnel: boolean): Promise<void> {
    const access = await request<ISshAccess>('POST', ['sandboxes', id, 'ssh']);
    const command = sshCommand(access, tunnel);
    this.commands.set(`${id}:${tunnel ? 'tunnel' : 'ssh'}`, command);
    Clipboard.copyToSystem(command.copied);
    this.schedule();
  }

  /** Add time to each of `sandboxes` (the same amount to each). */
  private async extend(sandboxes: ISandbox[]): Promise<void> {
    const one = sandboxes.length === 1;
    const answer = await InputDialog.getText({
      title: one
        ? `Extend ${displayName(sandboxes[0])}`
        : `Extend ${sandboxes.length} sandboxes`,
      label: one
        ? `Time to add (e.g. 10m, 1h); it has ${timeLeft(sandboxes[0])} now`
        : 'Time to add to each (e.g. 10m, 1h)',
      text: '10m'
    });
    if (!answer.button.accept || !answer.value) {
      return;
    }
    const more = answer.value.trim();
    await this.each(sandboxes, async sandbox => {
      const info = await request<ISandbox>('POST', ['sandboxes', sandbox.id, 'timeout'], {
        add: more
      });
      this.onFeed({ type: 'updated', sandbox: info });
      this.note(sandbox.id, `Extended by ${more}: ${timeLeft(info)}.`);
    });
  }

  /** Kill each of `sandboxes`, after a confirmation naming them. */
  private async kill(sandboxes: ISandbox[]): Promise<void> {
    const one = sandboxes.length === 1;
    const names = sandboxes.map(s => `${displayName(s)} (${s.id})`);
    const body = h(
      'div',
      { class: 'jsb-confirm' },
      h('p', {}, 'Their processes and files are gone for good.'),
      h(
        'ul',
        { class: 'jsb-confirm-list' },
        ...names.slice(0, BULK_NAMES_SHOWN).map(n => h('li', {}, n))
      ),
      ...(names.length > BULK_NAMES_SHOWN
        ? [h('p', {}, `and ${names.length - BULK_NAMES_SHOWN} more`)]
        : [])
    );
    const answer = await showDialog({
      title: one
        ? `Kill ${displayName(sandboxes[0])}?`
        : `Kill ${sandboxes.length} sandboxes?`,
      body: new Widget({ node: body }),
      buttons: [
        Dialog.cancelButton(),
        Dialog.warnButton({ label: one ? 'Kill' : `Kill ${sandboxes.length}` })
      ]
    });
    if (answer.button.accept) {
      await this.each(sandboxes, async sandbox => {
        await request('DELETE', ['sandboxes', sandbox.id]);
        this.selected.delete(sandbox.id);
      });
    }
  }

  /** Run `task` on every sandbox at once; one error message lists what failed. */
  private async each(
    sandboxes: ISandbox[],
    task: (sandbox: ISandbox) => Promise<void>
  ): Promise<void> {
    const results = await Promise.allSettled(sandboxes.map(task));
    const failed = results
      .map((r, i) =>
        r.status === 'rejected'
          ? `${displayName(sandboxes[i])}: ${r.reason?.message ?? r.reason}`
          : ''
      )
      .filter(Boolean);
    if (failed.length) {
      throw new Error(failed.join('\n'));
    }
  }

  private note(id: string, text: string): void {
    this.notes.set(id, text);
    window.setTimeout(() => {
      if (this.notes.get(id) === text) {
        this.notes.delete(id);
        this.schedule();
      }
    }, NOTE_MS);
    this.schedule();
  }

  private selectedSandboxes(): ISandbox[] {
    return [...this.selected].map(id => this.sandboxes.get(id)!).filter(Boolean);
  }

  private forget(id: string): void {
    this.sandboxes.delete(id);
    this.history.delete(id);
    this.commands.delete(`${id}:ssh`);
    this.commands.delete(`${id}:tunnel`);
    this.selected.delete(id);
    this.details.delete(id);
    this.notes.delete(id);
    this.logs.get(id)?.close();
    this.logs.delete(id);
    this.cards.get(id)?.node.remove();
    this.cards.delete(id);
    this.table.forget(id);
  }

  private toggleLogs(id: string): void {
    const view = this.logs.get(id);
    if (view) {
      view.close();
      this.logs.delete(id);
    } else {
      this.logs.set(id, new LogView(id));
    }
    this.schedule();
  }

  private async guard(what: string, run: () => Promise<void>): Promise<void> {
    try {
      await run();
    } catch (error) {
      await showErrorMessage(what, error as Error);
    }
  }

  private readonly clock: number;
  private state: IViewState = { ...DEFAULT_STATE };
  private readonly count = h(
    'span',
    { class: 'jsb-count', 'aria-label': 'sandboxes' },
    '0'
  );
  private readonly search = h('input', {
    type: 'search',
    class: 'jp-mod-styled jsb-search-input',
    placeholder: 'Search name, id, user, label',
    'aria-label': 'Search sandboxes'
  });
  private readonly filters = new Map<string, HTMLSelectElement>();
  private readonly viewButtons = new Map<View, ToolbarButton>();
  private readonly quota = h('section', {
    class: 'jsb-quota',
    'aria-label': 'Your quota'
  });
  private readonly bulkCount = h('span', { class: 'jsb-bulk-count', role: 'status' });
  private readonly bulk = h(
    'div',
    { class: 'jsb-bulk', role: 'toolbar', 'aria-label': 'Selected sandboxes' },
    this.bulkCount,
    ' ',
    button(
      'Extend',
      { 'data-action': 'bulk-extend' },
      addIcon,
      () => void this.guard('Extend', () => this.extend(this.selectedSandboxes()))
    ),
    ' ',
    button(
      'Kill',
      { 'data-action': 'bulk-kill', class: 'jsb-danger' },
      closeIcon,
      () => void this.guard('Kill', () => this.kill(this.selectedSandboxes()))
    ),
    ' ',
    button(
      'Clear selection',
      { 'data-action': 'bulk-clear', class: 'jp-mod-minimal' },
      undefined,
      () => {
        this.selected.clear();
        this.schedule();
      }
    )
  );
  private readonly body = h('div', { class: 'jsb-body' });
  private readonly form = this.buildForm();
  private readonly list = h('div', { class: 'jsb-list' });
  private readonly table = new Table({
    sort: key => {
      const same = this.state.sort === key;
      this.setState({ sort: key, descending: same ? !this.state.descending : false });
    },
    select: (ids, on) => {
      ids.forEach(id => (on ? this.selected.add(id) : this.selected.delete(id)));
      this.schedule();
    },
    act: (action, id) => this.act(action, id)
  });
  private readonly empty = h(
    'p',
    { class: 'jsb-empty' },
    'No sandboxes. Create one here or with %%sandbox.'
  );
  private readonly noMatch = h('p', { class: 'jsb-none' }, 'No sandbox matches.');
  private readonly cards = new Map<string, Card>();
  private socket: WebSocket | null = null;
  private pending: number | null = null;
  private sandboxes = new Map<string, ISandbox>();
  private notebooks = new Map<string, string>();
  private usage: IQuotaUsage | null = null;
  private system = false;
  private readonly history = new Map<string, ISample[]>();
  private readonly commands = new Map<string, ISshCommand>();
  private readonly logs = new Map<string, LogView>();
  private readonly selected = new Set<string>();
  private readonly details = new Set<string>();
  private readonly notes = new Map<string, string>();
}
