// A small SVG line chart: one series per metric, a point per epoch, optional horizontal reference lines.
const ns = 'http://www.w3.org/2000/svg';

function el(name, attributes = {}, text) {
  const node = document.createElementNS(ns, name);
  for (const [k, v] of Object.entries(attributes)) {
    node.setAttribute(k, String(v));
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/**
 * series: [{ key, name, values: [{x, y}] }]; lines: [{ key, name, y }]; range: [min, max] or null (auto).
 * Returns a figure with the SVG, a legend and a caption.
 */
export function lineChart({ title, series, lines = [], range = null, xLabel = 'epoch' }) {
  const width = 720, height = 260, left = 48, right = 16, top = 14, bottom = 36;
  const all = series.flatMap((s) => s.values);
  const xs = all.map((p) => p.x);
  const ys = [...all.map((p) => p.y), ...lines.map((l) => l.y)];
  const xMin = Math.min(1, ...xs), xMax = Math.max(xMin + 1, ...xs);
  let [yMin, yMax] = range ?? [Math.min(...ys, 0), Math.max(...ys, 0.1)];
  if (!range) {
    yMax += (yMax - yMin) * 0.08;
  }
  const px = (x) => left + ((x - xMin) / (xMax - xMin)) * (width - left - right);
  const py = (y) => top + (1 - (y - yMin) / (yMax - yMin || 1)) * (height - top - bottom);

  const svg = el('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title });
  svg.append(el('title', {}, title));
  for (let i = 0; i <= 4; i++) {
    const y = yMin + ((yMax - yMin) * i) / 4;
    svg.append(el('line', { class: 'gridline', x1: left, x2: width - right, y1: py(y), y2: py(y) }));
    svg.append(el('text', { x: left - 6, y: py(y) + 4, 'text-anchor': 'end' }, y.toFixed(2)));
  }
  const step = Math.max(1, Math.ceil((xMax - xMin) / 12));
  for (let x = Math.ceil(xMin); x <= xMax; x += step) {
    svg.append(el('text', { x: px(x), y: height - bottom + 16, 'text-anchor': 'middle' }, String(x)));
  }
  svg.append(el('text', { x: (left + width - right) / 2, y: height - 4, 'text-anchor': 'middle' }, xLabel));
  svg.append(el('line', { class: 'axis', x1: left, x2: left, y1: top, y2: height - bottom }));
  svg.append(el('line', { class: 'axis', x1: left, x2: width - right, y1: height - bottom, y2: height - bottom }));
  for (const line of lines) {
    const node = el('line', { class: `baseline s-${line.key}`, 'data-series': line.key, x1: left, x2: width - right, y1: py(line.y), y2: py(line.y) });
    node.append(el('title', {}, `${line.name}: ${line.y.toFixed(4)}`));
    svg.append(node);
  }
  for (const s of series) {
    svg.append(el('polyline', { class: `s-${s.key}`, points: s.values.map((p) => `${px(p.x)},${py(p.y)}`).join(' ') }));
    for (const p of s.values) {
      const point = el('circle', { class: `point s-${s.key}`, 'data-series': s.key, cx: px(p.x), cy: py(p.y), r: 3.5 });
      point.append(el('title', {}, `${s.name}, ${xLabel} ${p.x}: ${p.y.toFixed(4)}`));
      svg.append(point);
    }
  }

  const figure = document.createElement('figure');
  figure.className = 'chart';
  const caption = document.createElement('figcaption');
  caption.textContent = title;
  const legend = document.createElement('div');
  legend.className = 'legend';
  for (const item of [...series, ...lines]) {
    const entry = document.createElement('span');
    const swatch = document.createElement('i');
    swatch.className = `s-${item.key}`;
    entry.append(swatch, item.name);
    legend.append(entry);
  }
  figure.append(caption, legend, svg);
  return figure;
}
