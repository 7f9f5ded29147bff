/**
 * The server extension's REST and websocket endpoints (under `<base_url>sandbox/api/`).
 */
import { PageConfig, URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface IUsage {
  available?: boolean;
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
  labels: Record<string, string>;
  limits: { memory?: number | null; cpus?: number | null; pids?: number | null };
  network: string;
  limits_note?: string | null;
  /** Why a "failed" sandbox stopped, in words; its files are kept. */
  failure?: string | null;
  failed_at?: number | null;
  usage?: IUsage | null;
  notebook?: string | null;
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

const settings = ServerConnection.makeSettings();

function apiUrl(...parts: string[]): string {
  return URLExt.join(settings.baseUrl, 'sandbox/api', ...parts.map(encodeURIComponent));
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
  const response = await ServerConnection.makeRequest(apiUrl(...path), init, settings);
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(data.message || response.statusText);
  }
  return response.status === 204 ? (undefined as T) : response.json();
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

/** `ssh` through the Jupyter URL: `jupyter-sandbox tunnel` carries it over a websocket. */
export function tunnelCommand(access: ISshAccess): string {
  const server = PageConfig.getBaseUrl().replace(/%/g, '%%'); // ssh expands %-sequences
  const token = PageConfig.getToken();
  const auth = token ? ` --token ${token}` : '';
  const proxy = `jupyter-sandbox tunnel --url ${server}${auth} %h`;
  return `ssh -o ProxyCommand='${proxy}' ${access.username}@${access.sandbox_id}`;
}
