/**
 * Replays a sandbox's recorded terminal sessions (asciicast v2): a small terminal
 * screen in a <pre>, with play/pause and a seek bar.
 */
import { MainAreaWidget } from '@jupyterlab/apputils';
import { pauseIcon, runIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { IRecording, request, requestText } from './api';
import { button, h, setText } from './dom';
import { formatBytes, formatClock, formatDuration } from './format';

const FRAME_MS = 50;

export interface ICast {
  width: number;
  height: number;
  /** Output events: seconds from the start, and the bytes written to the terminal. */
  events: [number, string][];
  duration: number;
}

/** Parse an asciicast v2 file; throws with the line that is wrong. */
export function parseCast(text: string): ICast {
  const lines = text.split('\n').filter(line => line.trim());
  if (!lines.length) {
    throw new Error('the recording is empty');
  }
  const header = JSON.parse(lines[0]);
  if (header.version !== 2) {
    throw new Error(`not an asciicast v2 recording (version ${header.version})`);
  }
  const events: [number, string][] = [];
  lines.slice(1).forEach((line, i) => {
    let event: unknown;
    try {
      event = JSON.parse(line);
    } catch {
      throw new Error(`line ${i + 2} of the recording is not JSON`);
    }
    if (Array.isArray(event) && event[1] === 'o') {
      events.push([Number(event[0]), String(event[2])]);
    }
  });
  const duration = events.length ? events[events.length - 1][0] : 0;
  return { width: header.width || 80, height: header.height || 24, events, duration };
}

/** Enough of a VT100 to show a shell session: text, cursor moves, erases, scrolling. */
export class Screen {
  constructor(
    readonly width: number,
    readonly height: number
  ) {
    this.rows = Array.from({ length: height }, () => this.blank());
  }

  write(data: string): void {
    for (let i = 0; i < data.length; i++) {
      const c = data[i];
      if (c === '\x1b') {
        i = this.escape(data, i);
      } else if (c === '\r') {
        this.x = 0;
      } else if (c === '\n') {
        this.lineFeed();
      } else if (c === '\b') {
        this.x = Math.max(0, this.x - 1);
      } else if (c === '\t') {
        this.x = Math.min(this.width - 1, (Math.floor(this.x / 8) + 1) * 8);
      } else if (c >= ' ') {
        if (this.x >= this.width) {
          this.x = 0;
          this.lineFeed();
        }
        this.rows[this.y][this.x++] = c;
      }
    }
  }

  text(): string {
    return this.rows.map(row => row.join('').trimEnd()).join('\n');
  }

  private blank(): string[] {
    return new Array(this.width).fill(' ');
  }

  private lineFeed(): void {
    if (this.y === this.height - 1) {
      this.rows.shift();
      this.rows.push(this.blank());
    } else {
      this.y++;
    }
  }

  /** Handle the escape sequence at `data[i]`; returns the index of its last character. */
  private escape(data: string, i: number): number {
    const next = data[i + 1];
    if (next === ']') {
      // OSC (a window title): up to BEL or ESC \
      const end = data.slice(i).search(/\x07|\x1b\\/);
      return end < 0 ? data.length : i + end + (data[i + end] === '\x07' ? 0 : 1);
    }
    if (next !== '[') {
      return i + 1;
    }
    const match = /^\[([?>]?)([\d;]*)([@-~])/.exec(data.slice(i + 1));
    if (!match) {
      return i + 1;
    }
    const [whole, mode, params, final] = match;
    const n = params.split(';').map(p => parseInt(p, 10));
    const count = Math.max(1, n[0] || 1);
    if (!mode) {
      this.csi(final, n, count);
    } else if (mode === '?' && (params === '1049' || params === '47') && final === 'h') {
      this.rows = Array.from({ length: this.height }, () => this.blank());
    }
    return i + whole.length;
  }

  private csi(final: string, n: number[], count: number): void {
    const clamp = () => {
      this.x = Math.min(Math.max(this.x, 0), this.width - 1);
      this.y = Math.min(Math.max(this.y, 0), this.height - 1);
    };
    switch (final) {
      case 'A':
        this.y -= count;
        break;
      case 'B':
        this.y += count;
        break;
      case 'C':
        this.x += count;
        break;
      case 'D':
        this.x -= count;
        break;
      case 'G':
        this.x = count - 1;
        break;
      case 'H':
      case 'f':
        this.y = (n[0] || 1) - 1;
        this.x = (n[1] || 1) - 1;
        break;
      case 'J':
        if (n[0] === 2 || n[0] === 3) {
          this.rows = Array.from({ length: this.height }, () => this.blank());
        } else {
          this.rows[this.y].fill(' ', this.x);
          this.rows.slice(this.y + 1).forEach(row => row.fill(' '));
        }
        break;
      case 'K':
        if (n[0] === 2) {
          this.rows[this.y].fill(' ');
        } else if (n[0] === 1) {
          this.rows[this.y].fill(' ', 0, this.x + 1);
        } else {
          this.rows[this.y].fill(' ', this.x);
        }
        break;
      case 'P':
        this.rows[this.y].splice(this.x, count);
        this.rows[this.y].push(...new Array(count).fill(' '));
        break;
    }
    clamp();
  }

  private rows: string[][];
  private x = 0;
  private y = 0;
}

/** Plays one recording: play/pause, a seek bar, the time. */
export class Player {
  readonly node: HTMLElement;

  constructor(private readonly cast: ICast) {
    this.seek.max = String(cast.duration);
    this.seek.step = 'any';
    this.seek.value = '0';
    this.seek.oninput = () => this.show(Number(this.seek.value));
    this.node = h(
      'div',
      { class: 'jsb-player' },
      h('div', { class: 'jsb-player-controls' }, this.play, this.seek, this.clock),
      this.screen
    );
    this.screen.style.width = `${cast.width + 1}ch`;
    this.show(0);
  }

  dispose(): void {
    this.pause();
  }

  toggle(): void {
    if (this.timer === null) {
      this.start();
    } else {
      this.pause();
    }
  }

  /** The screen as it was `time` seconds into the session. */
  show(time: number): void {
    this.time = Math.min(time, this.cast.duration);
    const screen = new Screen(this.cast.width, this.cast.height);
    for (const [at, data] of this.cast.events) {
      if (at > this.time) {
        break;
      }
      screen.write(data);
    }
    setText(this.screen, screen.text());
    this.seek.value = String(this.time);
    setText(
      this.clock,
      `${formatDuration(this.time)} of ${formatDuration(this.cast.duration)}`
    );
  }

  private start(): void {
    if (this.time >= this.cast.duration) {
      this.time = 0;
    }
    let last = performance.now();
    this.timer = window.setInterval(() => {
      const now = performance.now();
      this.show(this.time + (now - last) / 1000);
      last = now;
      if (this.time >= this.cast.duration) {
        this.pause();
      }
    }, FRAME_MS);
    this.setPlaying(true);
  }

  private pause(): void {
    if (this.timer !== null) {
      window.clearInterval(this.timer);
      this.timer = null;
    }
    this.setPlaying(false);
  }

  private setPlaying(playing: boolean): void {
    this.play.replaceWith(
      (this.play = button(
        playing ? 'Pause' : 'Play',
        { class: 'jsb-player-play', 'aria-pressed': String(playing) },
        playing ? pauseIcon : runIcon,
        () => this.toggle()
      ))
    );
  }

  private play = button('Play', { class: 'jsb-player-play' }, runIcon, () =>
    this.toggle()
  );
  private readonly seek = h('input', {
    type: 'range',
    class: 'jsb-player-seek',
    min: '0',
    'aria-label': 'Position in the recording'
  });
  private readonly clock = h('span', { class: 'jsb-player-clock' });
  private readonly screen = h('pre', { class: 'jsb-player-screen', role: 'img' });
  private time = 0;
  private timer: number | null = null;
}

/** The recordings list answer: a list, or an object holding one. */
function recordingsOf(answer: unknown): IRecording[] {
  const list = Array.isArray(answer)
    ? answer
    : ((answer as { recordings?: IRecording[] })?.recordings ?? []);
  return [...list].sort((a, b) => b.started_at - a.started_at);
}

/** A main-area tab with a sandbox's recordings, the chosen one in a player. */
export async function recordingsTab(
  sandboxId: string,
  name: string
): Promise<MainAreaWidget> {
  const recordings = recordingsOf(
    await request<unknown>('GET', ['sandboxes', sandboxId, 'recordings'])
  );
  const content = new Widget();
  content.addClass('jsb-Recordings');
  const stage = h('div', { class: 'jsb-player-stage' });
  let player: Player | null = null;
  const choose = async (recording: string) => {
    player?.dispose();
    player = null;
    try {
      const cast = parseCast(
        await requestText(['sandboxes', sandboxId, 'recordings', recording])
      );
      player = new Player(cast);
      stage.replaceChildren(player.node);
    } catch (error) {
      stage.replaceChildren(
        h(
          'p',
          { class: 'jsb-error' },
          `Cannot play ${recording}: ${(error as Error).message}`
        )
      );
    }
  };
  if (!recordings.length) {
    content.node.append(
      h('p', {}, `No terminal session of ${name} has been recorded yet.`)
    );
  } else {
    const select = h(
      'select',
      { class: 'jp-mod-styled jsb-recording-select', 'aria-label': 'Recording' },
      ...recordings.map(r =>
        h(
          'option',
          { value: r.name },
          `${formatClock(r.started_at)} · ${r.name} · ${formatBytes(r.size)}`
        )
      )
    );
    select.onchange = () => void choose(select.value);
    content.node.append(
      h('label', { class: 'jsb-recording-pick' }, 'Session ', select),
      stage
    );
    void choose(recordings[0].name);
  }
  content.disposed.connect(() => player?.dispose());
  const widget = new MainAreaWidget({ content });
  widget.id = `jupyter-sandbox-recordings-${sandboxId}`;
  widget.title.label = `Recordings: ${name}`;
  widget.title.closable = true;
  return widget;
}
