// A small vertical bar chart as an SVG string, with a y axis, round ticks and x labels. Labels are escaped.

import { escapeHtml } from "./markdown.js";

function niceTicks(max, count = 4) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let v = 0; v < max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  if (ticks[ticks.length - 1] < max) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
  return ticks;
}

function tickLabel(v) {
  if (v === 0) return "0";
  if (Math.abs(v) >= 1000) return `${(v / 1000).toFixed(1).replace(/\.0$/, "")}k`;
  if (Math.abs(v) >= 1) return String(Number(v.toFixed(2)));
  return String(Number(v.toPrecision(2)));
}

export function barChartSvg(items, { title = "", width = 720, height = 240, color = "#2563eb" } = {}) {
  const left = 56, right = 12, top = 30, bottom = 36;
  const plotW = width - left - right, plotH = height - top - bottom;
  const ticks = niceTicks(Math.max(0, ...items.map(([, v]) => v)));
  const yMax = ticks[ticks.length - 1] || 1;
  const n = items.length || 1;
  const slot = plotW / n;
  const y = (v) => top + plotH - (plotH * v) / yMax;
  const parts = [
    `<svg class="chart bar-chart" role="img" viewBox="0 0 ${width} ${height}" width="100%" xmlns="http://www.w3.org/2000/svg" font-family="system-ui, sans-serif" font-size="11">`,
    `<title>${escapeHtml(title)}</title>`,
    `<text x="${width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">${escapeHtml(title)}</text>`,
  ];
  for (const t of ticks) {
    parts.push(`<line x1="${left}" x2="${left + plotW}" y1="${y(t).toFixed(1)}" y2="${y(t).toFixed(1)}" stroke="#eef2f7"/>`);
    parts.push(`<text x="${left - 6}" y="${(y(t) + 4).toFixed(1)}" text-anchor="end" fill="#475569">${escapeHtml(tickLabel(t))}</text>`);
  }
  parts.push(`<line x1="${left}" y1="${top}" x2="${left}" y2="${top + plotH}" stroke="#94a3b8"/>`);
  parts.push(`<line x1="${left}" y1="${top + plotH}" x2="${left + plotW}" y2="${top + plotH}" stroke="#94a3b8"/>`);
  const every = Math.max(1, Math.ceil(n / 10));
  items.forEach(([label, value], i) => {
    const x = left + i * slot;
    const h = (plotH * value) / yMax;
    parts.push(`<rect class="chart-bar" x="${(x + slot * 0.15).toFixed(1)}" y="${(top + plotH - h).toFixed(1)}" width="${(slot * 0.7).toFixed(1)}" height="${h.toFixed(1)}" fill="${color}"><title>${escapeHtml(label)}: ${escapeHtml(String(value))}</title></rect>`);
    if (i % every === 0 || i === n - 1) {
      parts.push(`<text x="${(x + slot / 2).toFixed(1)}" y="${top + plotH + 14}" text-anchor="middle" fill="#475569">${escapeHtml(label)}</text>`);
    }
  });
  parts.push("</svg>");
  return parts.join("");
}
