/*
 * DOM helpers. The panel updates its nodes in place and only where something changed,
 * so that a refresh (every usage sample) never disturbs a selection, a focused input or
 * a scroll, and thirty or a hundred sandboxes cost a few text comparisons a tick.
 */
import { LabIcon } from '@jupyterlab/ui-components';

export function h<K extends keyof HTMLElementTagNameMap>(
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

export function setText(node: Node, text: string): void {
  if (node.textContent !== text) {
    node.textContent = text;
  }
}

export function setAttr(node: Element, name: string, value: string): void {
  if (node.getAttribute(name) !== value) {
    node.setAttribute(name, value);
  }
}

export function setValue(node: HTMLInputElement, value: string): void {
  if (node.value !== value) {
    node.value = value;
  }
}

/** Make `node` a child of `parent` (appended) or not, without moving it needlessly. */
export function place(parent: Element, node: Element, present: boolean): void {
  if (present && node.parentElement !== parent) {
    parent.append(node);
  } else if (!present) {
    node.remove();
  }
}

/** Put `nodes` into `parent` in this order, moving only those out of place. */
export function arrange(parent: Element, nodes: Element[]): void {
  nodes.forEach((node, i) => {
    const current = parent.children[i] ?? null;
    if (current !== node) {
      parent.insertBefore(node, current);
    }
  });
  while (parent.children.length > nodes.length) {
    parent.lastElementChild!.remove();
  }
}

/** A JupyterLab-styled button, with an icon from @jupyterlab/ui-components. */
export function button(
  label: string,
  attrs: Record<string, string>,
  icon?: LabIcon,
  onClick?: () => void
): HTMLButtonElement {
  const node = h('button', {
    type: 'button',
    class: `jp-Button jp-mod-styled jp-mod-small ${attrs.class ?? ''}`.trim(),
    ...Object.fromEntries(Object.entries(attrs).filter(([k]) => k !== 'class'))
  });
  if (icon) {
    node.append(
      icon.element({ tag: 'span', className: 'jsb-icon', elementSize: 'small' })
    );
  }
  if (label) {
    node.append(h('span', { class: 'jsb-button-label' }, label));
  }
  if (onClick) {
    node.onclick = onClick;
  }
  return node;
}
