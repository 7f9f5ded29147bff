/**
 * A small line chart of the last samples, with a scale (its top and bottom values and
 * the time span), a dot on the latest value, and a tooltip giving the value and the time
 * under the pointer.
 */
import { formatClock, formatDuration } from './format';
import { h, setAttr, setText } from './dom';

export const HISTORY = 60;
const HEIGHT = 40;
const SVG = 'http://www.w3.org/2000/svg';

export interface IPoint {
  time: number;
  value: number;
}

export class Chart {
  readonly node: HTMLElement;

  /**
   * @param kind - a class suffix (`cpu`, `memory`) and what the caption starts with
   * @param format - writes a value with its unit
   */
  constructor(
    private readonly title: string,
    kind: string,
    private readonly format: (value: number) => string
  ) {
    this.line = document.createElementNS(SVG, 'polyline');
    this.area = document.createElementNS(SVG, 'polygon');
    this.marker = document.createElementNS(SVG, 'line');
    this.marker.setAttribute('class', 'jsb-chart-marker');
    this.marker.setAttribute('y1', '0');
    this.marker.setAttribute('y2', String(HEIGHT));
    this.svg = document.createElementNS(SVG, 'svg');
    this.svg.setAttribute('viewBox', `0 0 ${HISTORY - 1} ${HEIGHT}`);
    this.svg.setAttribute('preserveAspectRatio', 'none');
    this.svg.setAttribute('role', 'img');
    for (const y of [0, HEIGHT / 2]) {
      const grid = document.createElementNS(SVG, 'line');
      grid.setAttribute('class', 'jsb-chart-grid');
      grid.setAttribute('x1', '0');
      grid.setAttribute('x2', String(HISTORY - 1));
      grid.setAttribute('y1', String(y + 0.5));
      grid.setAttribute('y2', String(y + 0.5));
      this.svg.append(grid);
    }
    this.svg.append(this.area, this.line, this.marker);
    const plot = h(
      'div',
      { class: 'jsb-chart-plot' },
      h('div', { class: 'jsb-chart-axis' }, this.top, this.middle, h('span', {}, '0')),
      h('div', { class: 'jsb-chart-area' }, this.svg, this.dot),
      this.tip
    );
    this.node = h(
      'figure',
      { class: `jsb-chart jsb-chart-${kind}` },
      h('figcaption', { class: 'jsb-chart-caption' }, this.caption),
      plot,
      h('div', { class: 'jsb-chart-time' }, this.span, h('span', {}, 'now'))
    );
    this.tip.hidden = true;
    this.dot.hidden = true;
    this.svg.onpointermove = event => this.point(event);
    this.svg.onpointerleave = () => this.unpoint();
  }

  /** Draw `points` (oldest first) on a scale from 0 to `max`; `caption` says the latest. */
  update(points: IPoint[], max: number, caption: string): void {
    this.points = points;
    this.max = max || 1;
    setText(this.caption, caption);
    setText(this.top, this.format(this.max));
    setText(this.middle, this.format(this.max / 2));
    const span = points.length > 1 ? points[points.length - 1].time - points[0].time : 0;
    setText(this.span, span > 0 ? `−${formatDuration(span)}` : '');
    const offset = HISTORY - points.length;
    const xy = points.map((p, i) => `${offset + i},${this.y(p.value).toFixed(1)}`);
    setAttr(this.line, 'points', xy.join(' '));
    setAttr(
      this.area,
      'points',
      xy.length ? `${offset},${HEIGHT} ${xy.join(' ')} ${HISTORY - 1},${HEIGHT}` : ''
    );
    // The latest value as a dot: a single sample draws no line, yet it is seen.
    const latest = points[points.length - 1];
    this.dot.hidden = !latest;
    if (latest) {
      this.dot.style.top = `${(this.y(latest.value) / HEIGHT) * 100}%`;
    }
    setAttr(
      this.svg,
      'aria-label',
      `${this.title}: ${caption}, scale 0 to ${this.format(this.max)}`
    );
    if (this.pointed !== null) {
      this.show(this.pointed);
    }
  }

  private y(value: number): number {
    return HEIGHT - (Math.min(Math.max(value, 0), this.max) / this.max) * (HEIGHT - 1);
  }

  private point(event: PointerEvent): void {
    const box = this.svg.getBoundingClientRect();
    const x = Math.round(((event.clientX - box.left) / box.width) * (HISTORY - 1));
    this.pointed = x;
    this.show(x);
  }

  private show(x: number): void {
    const index = x - (HISTORY - this.points.length);
    const sample = this.points[index];
    if (!sample) {
      this.unpoint();
      this.pointed = x;
      return;
    }
    setAttr(this.marker, 'x1', String(x));
    setAttr(this.marker, 'x2', String(x));
    this.marker.style.visibility = 'visible';
    setText(
      this.tip,
      `${this.title} ${this.format(sample.value)} at ${formatClock(sample.time)}`
    );
    this.tip.style.left = `${(x / (HISTORY - 1)) * 100}%`;
    this.tip.classList.toggle('jsb-chart-tip-left', x > HISTORY / 2);
    this.tip.hidden = false;
  }

  private unpoint(): void {
    this.pointed = null;
    this.tip.hidden = true;
    this.marker.style.visibility = 'hidden';
  }

  private readonly svg: SVGSVGElement;
  private readonly line: SVGPolylineElement;
  private readonly area: SVGPolygonElement;
  private readonly marker: SVGLineElement;
  private readonly caption = h('span');
  private readonly top = h('span');
  private readonly middle = h('span');
  private readonly span = h('span');
  private readonly dot = h('span', { class: 'jsb-chart-dot' });
  private readonly tip = h('div', { class: 'jsb-chart-tip', role: 'tooltip' });
  private points: IPoint[] = [];
  private max = 1;
  private pointed: number | null = null;
}
