// The canvas: the image, saved objects, proposals, the working mask and the prompts, under a
// zoom/pan transform (S.view: screen = image * scale + offset).
import { S, $ } from "./state.js";
import { decodeRle } from "./rle.js";

export const canvas = $("canvas");
const ctx = canvas.getContext("2d");
// Transient drawing state the mouse handlers set: the box being dragged and the brush cursor.
export const overlay = { dragBox: null, brushCursor: null };
let workCanvas = null;

function hexRgb(hex) { const n = parseInt(hex.slice(1), 16); return [(n >> 16) & 255, (n >> 8) & 255, n & 255]; }

export function maskCanvas(mask, w, h, rgb, fillAlpha, outlineAlpha) {
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const cctx = c.getContext("2d");
  const im = cctx.createImageData(w, h);
  const d = im.data;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const i = y * w + x;
    if (!mask[i]) continue;
    const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w];
    const a = edge ? outlineAlpha : fillAlpha;
    if (!a) continue;
    d[4 * i] = rgb[0]; d[4 * i + 1] = rgb[1]; d[4 * i + 2] = rgb[2]; d[4 * i + 3] = a;
  }
  cctx.putImageData(im, 0, 0);
  return c;
}

// A small picture of a mask (nearest sample, long side `side` pixels) for the candidate list: drawing
// three full-size canvases per click cost more than the rest of the page's work.
// `at(y, x)`, when given, says whether pixel (y, x) is in the mask (a mask not made at full size yet).
export function thumbCanvas(mask, w, h, side = 128, at = null) {
  const s = Math.min(1, side / Math.max(w, h));
  const tw = Math.max(1, Math.round(w * s)), th = Math.max(1, Math.round(h * s));
  const small = new Uint8Array(tw * th);
  for (let y = 0; y < th; y++) {
    const py = Math.min(h - 1, Math.floor((y + 0.5) / s)), row = py * w;
    for (let x = 0; x < tw; x++) {
      const px = Math.min(w - 1, Math.floor((x + 0.5) / s));
      small[y * tw + x] = at ? (at(py, px) ? 1 : 0) : mask[row + px];
    }
  }
  return maskCanvas(small, tw, th, [37, 99, 235], 255, 255);
}

export function labelColor(labelId) {
  const l = S.labels.find((x) => x.id === labelId);
  return l ? l.color : "#9ca3af";
}

export function resizeCanvas() {
  const r = canvas.getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(r.width));
  canvas.height = Math.max(1, Math.round(r.height));
  render();
}

export function fitView() {
  if (!S.image) return;
  const s = Math.min(canvas.width / S.image.width, canvas.height / S.image.height) * 0.95;
  S.view = { scale: s, ox: (canvas.width - S.image.width * s) / 2, oy: (canvas.height - S.image.height * s) / 2 };
  render();
}

export function toImage(ev) {
  const r = canvas.getBoundingClientRect();
  const sx = ev.clientX - r.left, sy = ev.clientY - r.top;
  return { x: (sx - S.view.ox) / S.view.scale, y: (sy - S.view.oy) / S.view.scale, sx, sy };
}

export function zoomAt(sx, sy, factor) {
  const v = S.view;
  const s = Math.min(64, Math.max(0.02, v.scale * factor));
  v.ox = sx - ((sx - v.ox) * s) / v.scale;
  v.oy = sy - ((sy - v.oy) * s) / v.scale;
  v.scale = s;
  render();
}

export function refreshWorkCanvas() {
  workCanvas = S.work && S.image ? maskCanvas(S.work, S.image.width, S.image.height, [37, 99, 235], 120, 255) : null;
}

export function render() {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!S.image || !S.img) return;
  const v = S.view;
  ctx.setTransform(v.scale, 0, 0, v.scale, v.ox, v.oy);
  ctx.imageSmoothingEnabled = v.scale < 1;
  ctx.drawImage(S.img, 0, 0, S.image.width, S.image.height);
  ctx.imageSmoothingEnabled = false;
  if (!S.allHidden) {
    for (const a of S.annotations) {
      if (S.hidden.has(a.id)) continue;
      let c = S.annCanvas.get(a.id);
      if (!c) {
        c = maskCanvas(decodeRle(a.segmentation), S.image.width, S.image.height, hexRgb(labelColor(a.label_id)),
          a.id === S.highlight ? 170 : 90, 255);
        S.annCanvas.set(a.id, c);
      }
      ctx.drawImage(c, 0, 0);
    }
  }
  S.proposals.forEach((p, i) => {
    if (!p.canvas) p.canvas = maskCanvas(decodeRle(p.segmentation), S.image.width, S.image.height, [250, 204, 21], 0, 230);
    if (i === S.propIndex) {
      if (!p.fillCanvas) p.fillCanvas = maskCanvas(decodeRle(p.segmentation), S.image.width, S.image.height, [250, 204, 21], 110, 255);
      ctx.drawImage(p.fillCanvas, 0, 0);
    } else ctx.drawImage(p.canvas, 0, 0);
  });
  if (workCanvas) ctx.drawImage(workCanvas, 0, 0);
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  const box = overlay.dragBox || S.box;
  if (box) {
    ctx.strokeStyle = "#22d3ee"; ctx.lineWidth = 2;
    ctx.strokeRect(box.x0 * v.scale + v.ox, box.y0 * v.scale + v.oy, (box.x1 - box.x0) * v.scale, (box.y1 - box.y0) * v.scale);
  }
  for (const p of S.points) {
    ctx.beginPath();
    ctx.arc(p.x * v.scale + v.ox, p.y * v.scale + v.oy, 5, 0, 2 * Math.PI);
    ctx.fillStyle = p.label ? "#22c55e" : "#ef4444"; ctx.fill();
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 1.5; ctx.stroke();
  }
  const cursor = overlay.brushCursor;
  if (cursor && S.tool !== "prompt") {
    ctx.beginPath();
    ctx.arc(cursor.sx, cursor.sy, S.brush * v.scale, 0, 2 * Math.PI);
    ctx.strokeStyle = S.tool === "brush" ? "#60a5fa" : "#f87171"; ctx.lineWidth = 1.5; ctx.stroke();
  }
}
