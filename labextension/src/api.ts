/**
 * The server extension's REST and websocket endpoints (under `<base_url>sandbox/api/`).
 */
import { PageConfig, URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface IUsage {
  available?: boolean;
  /** Percent of one CPU core, as `top` shows it: 200 is two cores busy. */
  cpu_percent?: number | null;
  memory_bytes?: number | null;
  pids?: number | null;
}

export interface ISandbox {
  id: string;
  name: string;
  status: string;
  created_at: number;
  timeout: string | number;
  expires_at: number | null;
  owner: string;
  /** The OS user who created it (system mode names each student). */
  user?: string;
  uid?: number;
  labels: Record<string, string>;
  limits: { memory?: number | null; cpus?: number | null; pids?: number | null };
  network: string;
  limits_note?: string | null;
  /** Why a "failed" sandbox stopped, in words. */
  failure?: string | null;
  /**
   * Whether its files outlive a failure: a failed sandbox's are there until its deadline or
   * a kill. False where a failure loses its home (kubernetes with an emptyDir home).
   */
  files_kept?: boolean;
  failed_at?: number | null;
  usage?: IUsage | null;
  /** The notebook of the kernel that made it, when the server had it at the time. */
  notebook?: string | null;
  /** Whether its terminal sessions are recorded (asciicast). */
  recording?: boolean;
}

export interface ISshAccess {
  hostname: string;
  port: number;
  username: string;
  command: string;
  expires_at: number | null;
  host_key_fingerprint: string;
  known_hosts_line: string;
  sandbox_id: string;
}

/** Options of the "New sandbox" form, as `%%sandbox` takes them. */
export interface ICreateOptions {
  name?: string;
  timeout?: string;
  memory?: string;
  cpus?: number;
  pids?: number;
  network?: string;
  env?: Record<string, string>;
  /** A directory on the server (relative to its root) uploaded into the sandbox's home. */
  image?: string;
}

export type FeedMessage =
  | { type: 'snapshot'; sandboxes: ISandbox[] }
  | { type: 'created' | 'updated' | 'ended'; sandbox: ISandbox }
  | { type: 'usage'; time: number; usage: Record<string, IUsage | null> };

export interface ILogEntry {
  seq: number;
  time: number;
  source: string;
  stream: string;
  text: string;
}

/** `GET /sandbox/api/usage`: the user's use against the quota (null = unlimited). */
export interface IQuotaUsage {
  available: boolean;
  user?: string;
  instructor?: boolean;
  mode?: string;
  quota?: Record<string, number | null>;
  usage?: Record<string, number>;
  /** Which table of the service's config file sets each quota key. */
  source?: Record<string, string | null>;
}

export interface IRecording {
  name: string;
  started_at: number;
  size: number;
}

const settings = ServerConnection.makeSettings();

function apiUrl(...parts: string[]): string {
  return URLExt.join(settings.baseUrl, 'sandbox/api', ...parts.map(encodeURIComponent));
}

async function fetchOk(path: string[], init: RequestInit = {}): Promise<Response> {
  const response = await ServerConnection.makeRequest(apiUrl(...path), init, settings);
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(data.message || `${response.status} ${response.statusText}`);
  }
  return response;
}

/** A JSON request; throws with the server's message on failure. */
export async function request<T>(
  method: string,
  path: string[],
  body?: unknown
): Promise<T> {
  const init: RequestInit = { method };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
  }
  const response = await fetchOk(path, init);
  return response.status === 204 ? (undefined as T) : response.json();
}

/** A text resource (a recording). */
export async function requestText(path: string[]): Promise<string> {
  return (await fetchOk(path)).text();
}

/** A websocket to an endpoint, authenticated like JupyterLab's own. */
export function openSocket(
  path: string[],
  query: Record<string, string> = {}
): WebSocket {
  const url = new URL(
    URLExt.join(settings.wsUrl, 'sandbox/api', ...path.map(encodeURIComponent))
  );
  for (const [key, value] of Object.entries(query)) {
    url.searchParams.set(key, value);
  }
  if (settings.appendToken && settings.token) {
    url.searchParams.set('token', settings.token);
  }
  return new WebSocket(url.toString());
}

/** `value` as one word for a POSIX shell. */
export function shellQuote(value: string): string {
  return /^[\w@%+=:,./~-]+$/.test(value) ? value : `'${value.replace(/'/g, `'\\''`)}'`;
}

/** Where a copied SSH command keeps its credentials, on the machine it is pasted into. */
export const CREDENTIALS_DIR = '.ssh/jupyter-sandbox';

/**
 * An SSH command in two forms: what the panel shows (no secret in it) and what Copy
 * puts in the clipboard. The copied one first writes the credentials (the SSH token as
 * `User`, the Jupyter token for the tunnel) into 0600 files with shell builtins, then
 * runs `ssh -F <file>`: no token is ever in a process's argv or on screen.
 */
export interface ISshCommand {
  shown: string;
  copied: string;
}

/** `text` in double quotes, where only `$d` (the credentials directory) expands. */
function withDir(text: string): string {
  return `"${text.replace(/["\\`$]/g, '\\$&').replace(/\{dir\}/g, '$d')}"`;
}

/**
 * `ssh` into the sandbox: straight to the gateway, or (`tunnel`) through this Jupyter
 * server's URL, which `jupyter-sandbox tunnel` carries over a websocket.
 */
export function sshCommand(access: ISshAccess, tunnel: boolean): ISshCommand {
  const id = access.sandbox_id;
  const stem = `${id}${tunnel ? '-jupyter' : ''}`;
  // Lines with secrets are single-quoted; those naming files use $d, double-quoted.
  const config = [shellQuote(`Host ${id}`), shellQuote(`  User ${access.username}`)];
  const files: [string, string[]][] = [];
  if (tunnel) {
    const server = PageConfig.getBaseUrl().replace(/%/g, '%%'); // ssh expands %-sequences
    const token = PageConfig.getToken();
    if (token) {
      files.push([`${stem}.token`, [shellQuote(token)]]);
    }
    const auth = token ? ` --token-file {dir}/${stem}.token` : '';
    config.push(
      shellQuote(`  HostName ${id}`),
      withDir(
        `  ProxyCommand jupyter-sandbox tunnel --url ${shellQuote(server)}${auth} %h`
      )
    );
  } else {
    config.push(
      shellQuote(`  HostName ${access.hostname}`),
      shellQuote(`  Port ${access.port}`)
    );
  }
  const key = access.known_hosts_line.split(/\s+/).slice(1).join(' ');
  config.push(
    shellQuote(`  HostKeyAlias ${id}`),
    withDir(`  UserKnownHostsFile {dir}/${stem}.known_hosts`),
    shellQuote('  StrictHostKeyChecking yes')
  );
  files.push(
    [`${stem}.known_hosts`, [shellQuote(`${id} ${key}`)]],
    [`${stem}.config`, config]
  );
  // printf is a shell builtin: what it writes never shows in a process list.
  const writes = files.map(
    ([name, lines]) => `printf '%s\\n' ${lines.join(' ')} > "$d/${name}"`
  );
  const copied =
    ` (umask 077 && d="$HOME/${CREDENTIALS_DIR}" && mkdir -p "$d" && ${writes.join(' && ')})` +
    ` && ssh -F "$HOME/${CREDENTIALS_DIR}/${stem}.config" ${id}`;
  return { shown: `ssh -F ~/${CREDENTIALS_DIR}/${stem}.config ${id}`, copied };
}
