/**
 * How the panel writes durations, sizes, times and sandboxes' names and owners.
 */
import { ISandbox } from './api';

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
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const digits = unit === 0 || value >= 100 || Number.isInteger(value) ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

/** A wall-clock time (seconds since the epoch) as HH:MM:SS in local time. */
export function formatClock(seconds: number): string {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

/** Percent of one core, as `top` writes it. */
export function formatPercent(percent: number): string {
  return `${percent < 10 ? percent.toFixed(1) : Math.round(percent)}%`;
}

/** Labels a kernel puts on its sandboxes to find them again; the panel shows their meaning. */
export const INTERNAL_LABELS = new Set(['kernel', 'notebook']);

/** The name as typed in `%%sandbox NAME`: a kernel's sandboxes carry its id's start. */
export function displayName(sandbox: ISandbox): string {
  const kernel = sandbox.labels.kernel;
  const suffix = kernel ? `-${kernel.replace(/^ipython-/, '').slice(0, 8)}` : '';
  return suffix && sandbox.name.endsWith(suffix)
    ? sandbox.name.slice(0, -suffix.length)
    : sandbox.name;
}

/**
 * Who holds the sandbox: the notebook of its kernel as it is named now (`notebooks`
 * maps live kernel ids to their session's path, so a rename shows), else what the
 * service was told.
 */
export function displayOwner(sandbox: ISandbox, notebooks: Map<string, string>): string {
  const kernel = sandbox.labels.kernel;
  const live = kernel ? notebooks.get(kernel) : undefined;
  const notebook = live || sandbox.notebook || sandbox.labels.notebook;
  if (notebook) {
    return notebook;
  }
  return kernel ? `kernel ${kernel.slice(0, 8)}` : sandbox.owner;
}

/** Labels worth showing: the user's own, as "key=value". */
export function visibleLabels(sandbox: ISandbox): string[] {
  return Object.entries(sandbox.labels)
    .filter(([key]) => !INTERNAL_LABELS.has(key))
    .map(([key, value]) => `${key}=${value}`);
}

/** Seconds left before the deadline; Infinity for a "session" sandbox. */
export function secondsLeft(sandbox: ISandbox, now = Date.now() / 1000): number {
  return sandbox.expires_at === null ? Infinity : sandbox.expires_at - now;
}

/** What to do about a failed sandbox whose files went with it. */
export const FILES_LOST =
  'Its files are not kept: Restart starts it with an empty home ' +
  '(JUPYTER_SANDBOX_K8S_HOME=pvc on the service keeps homes across failures).';

/** Whether a failed sandbox's files are still there (services too old to say: they are). */
export function filesKept(sandbox: ISandbox): boolean {
  return sandbox.files_kept ?? true;
}

/** What is left, for a place already labelled "time left": "59m 56s", "session". */
export function remaining(sandbox: ISandbox): string {
  const failed = sandbox.status === 'failed';
  if (sandbox.status !== 'running' && !failed) {
    return sandbox.status;
  }
  if (failed && !filesKept(sandbox)) {
    return 'files not kept';
  }
  if (sandbox.expires_at === null) {
    return failed ? 'files kept for the session' : 'session';
  }
  const left = formatDuration(secondsLeft(sandbox));
  return failed ? `files kept ${left}` : left;
}

/** What is left, in a sentence: "59m 56s left". */
export function timeLeft(sandbox: ISandbox): string {
  const text = remaining(sandbox);
  return sandbox.status === 'running' && sandbox.expires_at !== null
    ? `${text} left`
    : text;
}
