/**
 * The compact table view: a row a sandbox, sortable by every column, grouped by owner
 * or label, with a checkbox a row for bulk actions. Rows are built once per sandbox and
 * updated in place.
 */
import {
  caretDownIcon,
  caretUpIcon,
  closeIcon,
  launchIcon,
  addIcon,
  terminalIcon
} from '@jupyterlab/ui-components';

import { ISandbox } from './api';
import { arrange, button, h, setAttr, setText } from './dom';

export type SortKey =
  'name' | 'status' | 'user' | 'owner' | 'left' | 'cpu' | 'memory' | 'labels';

export const COLUMNS: [SortKey, string][] = [
  ['name', 'Name'],
  ['status', 'Status'],
  ['user', 'User'],
  ['owner', 'Owner'],
  ['left', 'Time left'],
  ['cpu', 'CPU'],
  ['memory', 'Memory'],
  ['labels', 'Labels']
];

/** A row's cells as text, and the values its columns sort by. */
export interface IRowData {
  sandbox: ISandbox;
  text: Record<SortKey, string>;
  sortValue: Record<SortKey, string | number>;
}

export interface IGroup {
  key: string;
  label: string;
  rows: IRowData[];
}

export interface ITableHandlers {
  sort(key: SortKey): void;
  select(ids: string[], selected: boolean): void;
  act(action: string, id: string): void;
}

interface IRow {
  node: HTMLTableRowElement;
  check: HTMLInputElement;
  cells: Record<SortKey, HTMLElement>;
  detail: HTMLTableRowElement;
}

export class Table {
  readonly node: HTMLTableElement;

  constructor(private readonly handlers: ITableHandlers) {
    this.all.onchange = () => this.handlers.select(this.shownIds, this.all.checked);
    const head = h(
      'tr',
      {},
      h('th', { class: 'jsb-col-select', scope: 'col' }, this.all),
      ...COLUMNS.map(([key, label]) => {
        const sort = h(
          'button',
          { type: 'button', class: 'jsb-sort', 'data-sort': key },
          label,
          h('span', { class: 'jsb-sort-icon' })
        );
        sort.onclick = () => this.handlers.sort(key);
        const th = h('th', { class: `jsb-col-${key}`, scope: 'col' }, sort);
        this.heads.set(key, th);
        return th;
      }),
      h(
        'th',
        { class: 'jsb-col-actions', scope: 'col' },
        h('span', { class: 'jsb-sr-only' }, 'Actions')
      )
    );
    this.node = h(
      'table',
      { class: 'jsb-table', 'aria-label': 'Sandboxes' },
      h('thead', {}, head),
      this.body
    );
  }

  /** Show `groups` (one with key "" for no grouping), sorted and selected as given. */
  update(
    groups: IGroup[],
    sort: { key: SortKey; descending: boolean },
    selected: Set<string>,
    showUser: boolean,
    details: Map<string, HTMLElement>
  ): void {
    this.node.classList.toggle('jsb-hide-user', !showUser);
    for (const [key, th] of this.heads) {
      const sorted = key === sort.key;
      setAttr(
        th,
        'aria-sort',
        sorted ? (sort.descending ? 'descending' : 'ascending') : 'none'
      );
      const icon = th.querySelector('.jsb-sort-icon') as HTMLElement;
      const want = sorted ? (sort.descending ? 'down' : 'up') : '';
      if (icon.dataset.dir !== want) {
        icon.dataset.dir = want;
        icon.replaceChildren(
          ...(want
            ? [(want === 'down' ? caretDownIcon : caretUpIcon).element({ tag: 'span' })]
            : [])
        );
      }
    }
    const nodes: HTMLTableRowElement[] = [];
    const ids: string[] = [];
    for (const group of groups) {
      if (group.key) {
        nodes.push(this.groupRow(group));
      }
      for (const data of group.rows) {
        const row = this.row(data.sandbox.id);
        this.fill(row, data, selected.has(data.sandbox.id));
        nodes.push(row.node);
        ids.push(data.sandbox.id);
        const detail = details.get(data.sandbox.id);
        if (detail) {
          const cell = row.detail.firstElementChild as HTMLElement;
          if (detail.parentElement !== cell) {
            cell.replaceChildren(detail);
          }
          nodes.push(row.detail);
        }
        setAttr(row.cells.name, 'aria-expanded', String(!!detail));
      }
    }
    if (!ids.length) {
      nodes.push(this.none);
    }
    arrange(this.body, nodes);
    this.shownIds = ids;
    const chosen = ids.filter(id => selected.has(id)).length;
    this.all.checked = !!ids.length && chosen === ids.length;
    this.all.indeterminate = chosen > 0 && chosen < ids.length;
  }

  /** The countdown of a row, every second. */
  tick(id: string, left: string): void {
    const row = this.rows.get(id);
    if (row?.node.isConnected) {
      setText(row.cells.left, left);
    }
  }

  /** Forget the row of an ended sandbox. */
  forget(id: string): void {
    this.rows.get(id)?.node.remove();
    this.rows.get(id)?.detail.remove();
    this.rows.delete(id);
  }

  private row(id: string): IRow {
    let row = this.rows.get(id);
    if (row) {
      return row;
    }
    const check = h('input', {
      type: 'checkbox',
      class: 'jp-mod-styled jsb-select',
      'aria-label': `Select ${id}`
    });
    check.onchange = () => this.handlers.select([id], check.checked);
    const cells = {} as Record<SortKey, HTMLElement>;
    const tds = COLUMNS.map(([key]) => {
      const td = h('td', { class: `jsb-col-${key}` });
      if (key === 'name') {
        const open = h('button', {
          type: 'button',
          class: 'jsb-row-name',
          title: 'Show or hide its card'
        });
        open.onclick = () => this.handlers.act('details', id);
        td.append(open);
        cells[key] = open;
      } else {
        cells[key] = td;
      }
      return td;
    });
    const action = (name: string, title: string, icon: typeof addIcon) =>
      button(
        '',
        {
          class: 'jsb-action jp-mod-minimal',
          'data-action': name,
          title,
          'aria-label': title
        },
        icon,
        () => this.handlers.act(name, id)
      );
    const node = h(
      'tr',
      { class: 'jsb-row', 'data-id': id },
      h('td', { class: 'jsb-col-select' }, check),
      ...tds,
      h(
        'td',
        { class: 'jsb-col-actions' },
        action('terminal', 'Open a terminal in the sandbox', terminalIcon),
        action('logs-tab', 'Open the live log in a tab', launchIcon),
        action('extend', 'Add time before it ends', addIcon),
        action('kill', 'Kill the sandbox', closeIcon)
      )
    );
    const detail = h(
      'tr',
      { class: 'jsb-detail', 'data-id': id },
      h('td', { colspan: String(COLUMNS.length + 2) })
    );
    row = { node, check, cells, detail };
    this.rows.set(id, row);
    return row;
  }

  private fill(row: IRow, data: IRowData, selected: boolean): void {
    for (const [key] of COLUMNS) {
      setText(row.cells[key], data.text[key]);
    }
    setAttr(row.cells.owner, 'title', data.sandbox.owner);
    setAttr(
      row.cells.status,
      'class',
      `jsb-col-status jsb-status-${data.sandbox.status}`
    );
    setAttr(row.node, 'data-status', data.sandbox.status);
    row.check.checked = selected;
    row.node.classList.toggle('jsb-selected', selected);
    const failed = data.sandbox.status === 'failed';
    const terminal = row.node.querySelector<HTMLButtonElement>('[data-action=terminal]')!;
    terminal.disabled = failed;
  }

  private groupRow(group: IGroup): HTMLTableRowElement {
    let node = this.groups.get(group.key);
    if (!node) {
      node = h(
        'tr',
        { class: 'jsb-group' },
        h('th', { colspan: String(COLUMNS.length + 2), scope: 'rowgroup' })
      );
      this.groups.set(group.key, node);
    }
    setText(node.firstElementChild!, `${group.label} (${group.rows.length})`);
    return node;
  }

  private readonly all = h('input', {
    type: 'checkbox',
    class: 'jp-mod-styled jsb-select-all',
    'aria-label': 'Select all shown'
  });
  private readonly body = h('tbody');
  private readonly none = h(
    'tr',
    { class: 'jsb-none' },
    h('td', { colspan: String(COLUMNS.length + 2) }, 'No sandbox matches.')
  );
  private readonly heads = new Map<SortKey, HTMLElement>();
  private readonly rows = new Map<string, IRow>();
  private readonly groups = new Map<string, HTMLTableRowElement>();
  private shownIds: string[] = [];
}
