/**
 * The "Sandboxes" panel in the right sidebar of JupyterLab 4 and Notebook 7.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget } from '@jupyterlab/apputils';
import { IStateDB } from '@jupyterlab/statedb';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { SandboxPanel } from './panel';

const OPEN = 'jupyter-sandbox:open';

const icon = new LabIcon({
  name: 'jupyter-sandbox:icon',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">' +
    '<path class="jp-icon3" fill="#616161" d="M3 5h18v14H3zm2 2v10h14V7zm2 2 4 3-4 3v-2l2-1-2-1zm5 5h5v1.5h-5z"/>' +
    '</svg>'
});

/** Keep `widget`'s tab titled `label`, whatever its content sets later. */
function keepTitle(widget: Widget, label: string): void {
  const title = (widget as MainAreaWidget).content?.title ?? widget.title;
  const hold = () => {
    if (title.label !== label) {
      title.label = label;
    }
  };
  title.changed.connect(hold);
  hold();
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-sandbox:panel',
  description: 'Every sandbox at a glance: state, usage, logs, SSH and terminals.',
  autoStart: true,
  optional: [ICommandPalette, IStateDB],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    state: IStateDB | null
  ) => {
    const panel = new SandboxPanel({
      openTerminal: async (name, label) => {
        const widget = await app.commands.execute('terminal:open', { name });
        if (widget instanceof Widget) {
          keepTitle(widget, label);
        }
      },
      openTab: widget => {
        const twin = [...app.shell.widgets('main')].find(w => w.id === widget.id);
        if (twin) {
          widget.dispose();
          app.shell.activateById(twin.id);
          return;
        }
        app.shell.add(widget, 'main');
        app.shell.activateById(widget.id);
      },
      sessions: app.serviceManager.sessions,
      state
    });
    panel.title.icon = icon;
    app.shell.add(panel, 'right', { rank: 900 });
    app.commands.addCommand(OPEN, {
      label: 'Show Sandboxes',
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: OPEN, category: 'Sandboxes' });
  }
};

export default plugin;
