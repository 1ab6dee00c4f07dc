// The working object: prompts -> candidates -> hand edits -> accept, with undo/redo, and the mouse.
import { S, $, status, fail, modelLevels } from "./state.js";
import { api } from "./api.js";
import { encodeRle } from "./rle.js";
import { canvas, overlay, refreshWorkCanvas, render, thumbCanvas, toImage } from "./view.js";
import { decodePrompt } from "./decode.js";
import { currentLabelId, loadAnnotations } from "./objects.js";

// ------------------------------------------------------------------ undo / redo of the working state

function snapshot() {
  return { points: S.points.map((p) => ({ ...p })), box: S.box ? { ...S.box } : null, candidates: S.candidates,
           selected: S.selected, token: S.token, work: S.work, workSource: S.workSource, edits: S.edits };
}
function restore(s) {
  Object.assign(S, { points: s.points, box: s.box, candidates: s.candidates, selected: s.selected, token: s.token,
                     work: s.work, workSource: s.workSource, edits: s.edits || null });
  refreshWorkCanvas(); renderCandidates(); render();
}
export function pushUndo(entry) {
  S.undo.push(entry || { kind: "state", state: snapshot() });
  if (S.undo.length > 40) S.undo.shift();
  S.redo = [];
  updateButtons();
}
export async function undo() {
  const e = S.undo.pop();
  if (!e) return;
  if (e.kind === "state") { S.redo.push({ kind: "state", state: snapshot() }); restore(e.state); }
  else if (e.kind === "accept") {
    try { await api("DELETE", `/api/annotations/${e.annotation.id}`); } catch (err) { fail(err); }
    S.redo.push(e); restore(e.state); await loadAnnotations();
    status("undid the accepted object");
  }
  updateButtons();
}
export async function redo() {
  const e = S.redo.pop();
  if (!e) return;
  if (e.kind === "state") { S.undo.push({ kind: "state", state: snapshot() }); restore(e.state); }
  else if (e.kind === "accept") {
    const a = e.annotation;
    const out = await api("POST", `/api/images/${a.image_id}/annotations`, { annotations: [{
      segmentation: a.segmentation, label_id: a.label_id, score: a.score, source: a.source, meta: a.meta }] });
    S.undo.push({ ...e, annotation: out.annotations[0] });
    clearWork(false); await loadAnnotations();
  }
  updateButtons();
}

// ------------------------------------------------------------------ decoding

const nextFrame = () => new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));

export async function decode() {
  if (!S.image) return;
  if (!S.points.length && !S.box) { S.candidates = []; S.work = null; refreshWorkCanvas(); renderCandidates(); render(); return; }
  const seq = ++S.decodeSeq;
  const image = S.image;
  // Further clicks refine the chosen candidate: its low-res logits go back in as the mask input.
  // A multi-granularity model (Semantic-SAM) takes one click and answers with one candidate per level.
  const levels = modelLevels();
  const refine = !levels && S.candidates.length && S.points.length > 1 ? S.candidates[S.selected] : null;
  const prompt = {
    points: S.points.map((p) => ({ ...p })), box: S.box,
    maskInput: refine && refine.lowRes ? refine.lowRes : null,
    token: refine && !refine.lowRes && S.token ? { token: S.token, index: S.selected } : null,
    level: levels ? S.level : null,
  };
  const t0 = performance.now();
  const embStatus = (S.images.find((i) => i.id === image.id) || {}).embedding;
  status(embStatus === "ready" ? "decoding..." : "waiting for the image embedding...");
  let out;
  try { out = await decodePrompt(image, prompt); }
  catch (err) { if (seq === S.decodeSeq) fail(err); return; }
  if (seq !== S.decodeSeq) return;  // a newer prompt is on its way
  S.candidates = out.candidates;
  S.token = out.token;
  S.selected = out.best;
  selectCandidate(out.best, false);
  const t1 = performance.now();
  await nextFrame();  // the frame with the mask has been produced
  const timing = { mode: out.mode, decode_ms: out.decode_ms, round_trip_ms: t1 - t0, on_screen_ms: performance.now() - t0 };
  if (out.masks_ms !== undefined) timing.masks_ms = out.masks_ms;
  if (out.server) { timing.server_ms = out.server.decode; timing.server_total_ms = out.server.total; }
  S.lastTiming = timing;
  S.timings.push(timing);
  if (seq !== S.decodeSeq) return;
  const where = out.mode === "page" ? "in the page" : "on the server";
  status(`${S.candidates.length} candidates; decode ${out.decode_ms.toFixed(0)} ms ${where}, ` +
         `${timing.on_screen_ms.toFixed(0)} ms click to screen (${image.width}x${image.height})` +
         (out.fallback ? ` — in-page decoding failed (${out.fallback})` : ""));
}

// The level control (multi-granularity models): shows that level's candidate of the current click.
export function setLevel(level) {
  S.level = Math.max(1, Math.min(modelLevels() || 6, Math.round(level)));
  $("level").value = S.level; $("level-value").textContent = String(S.level);
  const i = S.candidates.findIndex((c) => c.level === S.level);
  if (i >= 0) selectCandidate(i);
}

export function selectCandidate(i, undoable = true) {
  if (i < 0 || i >= S.candidates.length) return;
  if (undoable) pushUndo();
  S.selected = i;
  S.work = withEdits(S.candidates[i].mask);
  S.workSource = S.edits ? "brush" : S.box && !S.points.length ? "box" : "click";
  refreshWorkCanvas(); renderCandidates(); render();
}

export function renderCandidates() {
  const box = $("candidates");
  box.innerHTML = "";
  S.candidates.forEach((c, i) => {
    const el = document.createElement("div");
    el.className = "candidate" + (i === S.selected && S.workSource !== "brush" ? " selected" : "");
    el.dataset.index = i;
    if (!c.thumb) c.thumb = c.maskAt ? thumbCanvas(null, S.image.width, S.image.height, 128, c.maskAt)
                                     : thumbCanvas(c.mask, S.image.width, S.image.height);
    el.appendChild(c.thumb);
    const label = document.createElement("div");
    label.textContent = (c.level ? `level ${c.level}: ` : `${i + 1}: `) + c.score.toFixed(3);
    label.className = "score";
    el.appendChild(label);
    el.onclick = () => selectCandidate(i);
    box.appendChild(el);
  });
  if (S.workSource === "brush") {
    const note = document.createElement("div");
    note.className = "muted"; note.textContent = "edited by hand";
    box.appendChild(note);
  }
  updateButtons();
}

export function updateButtons() {
  $("accept").disabled = !S.work;
  $("undo").disabled = !S.undo.length;
  $("redo").disabled = !S.redo.length;
}

export function clearWork(undoable = true) {
  if (undoable && (S.points.length || S.box || S.work)) pushUndo();
  S.points = []; S.box = null; S.candidates = []; S.token = null; S.work = null; S.workSource = null; S.edits = null;
  S.decodeSeq++;
  refreshWorkCanvas(); renderCandidates(); render();
}

// ------------------------------------------------------------------ accepting

export function toast(text) {
  const t = $("saved-toast");
  t.textContent = text; t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 1200);
}

export async function accept() {
  if (!S.work || !S.image || S.busy) return;
  let any = false;
  for (let i = 0; i < S.work.length; i++) if (S.work[i]) { any = true; break; }
  if (!any) { status("the mask is empty"); return; }
  S.busy = true;
  const state = snapshot();
  const cand = S.candidates[S.selected];
  const body = { annotations: [{
    segmentation: encodeRle(S.work, S.image.height, S.image.width),
    label_id: currentLabelId(),
    score: S.workSource === "brush" || !cand ? null : cand.score,
    source: S.workSource || "click",
    meta: { point_coords: S.points.filter((p) => p.label).map((p) => [p.x, p.y]), ...(S.box ? { box: [S.box.x0, S.box.y0, S.box.x1, S.box.y1] } : {}) },
  }] };
  try {
    const out = await api("POST", `/api/images/${S.image.id}/annotations`, body);
    // The server answered 201: the annotation is committed. Only now does the page say so.
    S.undo.push({ kind: "accept", annotation: out.annotations[0], state });
    S.redo = [];
    clearWork(false);
    toast("saved");
    await loadAnnotations();
    status(`saved object #${out.annotations[0].id}`);
  } catch (err) { fail(err); }
  finally { S.busy = false; updateButtons(); }
}

// ------------------------------------------------------------------ hand edits and the mouse

let drag = null;
export const keys = { space: false };

// Hand edits are a layer over the model's mask: a new click re-decodes and the strokes stay applied.
function withEdits(mask) {
  if (!S.edits) return mask;
  const out = new Uint8Array(mask);
  for (let i = 0; i < out.length; i++) if (S.edits[i]) out[i] = S.edits[i] > 0 ? 1 : 0;
  return out;
}

function paint(pt) {
  if (!S.image) return;
  const w = S.image.width, h = S.image.height;
  if (!drag.copied) {  // copies at the start of a stroke: candidates and undo snapshots stay untouched
    S.work = S.work ? new Uint8Array(S.work) : new Uint8Array(w * h);
    S.edits = S.edits ? new Int8Array(S.edits) : new Int8Array(w * h);
  }
  drag.copied = true;
  const r = S.brush, v = S.tool === "brush" ? 1 : 0;
  const from = drag.last || pt;
  const steps = Math.max(1, Math.ceil(Math.hypot(pt.x - from.x, pt.y - from.y) / Math.max(1, r / 2)));
  for (let s = 1; s <= steps; s++) {
    const cx = from.x + ((pt.x - from.x) * s) / steps, cy = from.y + ((pt.y - from.y) * s) / steps;
    for (let y = Math.max(0, Math.floor(cy - r)); y <= Math.min(h - 1, Math.ceil(cy + r)); y++)
      for (let x = Math.max(0, Math.floor(cx - r)); x <= Math.min(w - 1, Math.ceil(cx + r)); x++)
        if ((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= r * r) { S.work[y * w + x] = v; S.edits[y * w + x] = v ? 1 : -1; }
  }
  drag.last = pt;
  S.workSource = "brush";
  refreshWorkCanvas(); render();
}

function addPoint(pt, label) {
  if (pt.x < 0 || pt.y < 0 || pt.x > S.image.width || pt.y > S.image.height) { status("click inside the image"); return; }
  if (modelLevels()) {  // one positive click: a new click replaces the previous one
    if (label !== 1) { status("this model takes one positive click (no negative clicks): pick a level instead"); return; }
    pushUndo();
    S.points = []; S.box = null;
    S.points.push({ x: Math.round(pt.x * 10) / 10, y: Math.round(pt.y * 10) / 10, label });
    render();
    decode();
    return;
  }
  pushUndo();
  S.points.push({ x: Math.round(pt.x * 10) / 10, y: Math.round(pt.y * 10) / 10, label });
  render();
  decode();
}

export function setTool(tool) {
  S.tool = tool;
  for (const b of document.querySelectorAll("button.tool")) b.classList.toggle("active", b.dataset.tool === tool);
  canvas.style.cursor = tool === "prompt" ? "crosshair" : "none";
  render();
}

export function bindMouse() {
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("mousedown", (e) => {
    if (!S.image) return;
    const pt = toImage(e);
    if (e.button === 1 || keys.space) { drag = { pan: true, sx: pt.sx, sy: pt.sy }; e.preventDefault(); return; }
    if (e.button === 2) { addPoint(pt, 0); return; }
    if (e.button !== 0) return;
    if (S.tool !== "prompt") { pushUndo(); drag = { paint: true }; paint(pt); return; }
    drag = { start: pt, alt: e.altKey };
  });
  window.addEventListener("mousemove", (e) => {
    const pt = toImage(e);
    overlay.brushCursor = pt;
    if (!drag) { if (S.tool !== "prompt") render(); return; }
    if (drag.pan) { S.view.ox += pt.sx - drag.sx; S.view.oy += pt.sy - drag.sy; drag.sx = pt.sx; drag.sy = pt.sy; render(); return; }
    if (drag.paint) { paint(pt); return; }
    if (Math.hypot(pt.sx - drag.start.sx, pt.sy - drag.start.sy) > 5) {
      overlay.dragBox = { x0: Math.min(drag.start.x, pt.x), y0: Math.min(drag.start.y, pt.y), x1: Math.max(drag.start.x, pt.x), y1: Math.max(drag.start.y, pt.y) };
      render();
    }
  });
  window.addEventListener("mouseup", () => {
    if (!drag) return;
    const d = drag; drag = null;
    if (d.pan || d.paint) { renderCandidates(); return; }
    const dragBox = overlay.dragBox;
    if (dragBox) {
      const clip = (v, hi) => Math.max(0, Math.min(hi, v));
      const b = { x0: clip(dragBox.x0, S.image.width), y0: clip(dragBox.y0, S.image.height), x1: clip(dragBox.x1, S.image.width), y1: clip(dragBox.y1, S.image.height) };
      overlay.dragBox = null;
      if (b.x1 - b.x0 >= 1 && b.y1 - b.y0 >= 1) { pushUndo(); S.box = b; decode(); }
      render();
      return;
    }
    addPoint(d.start, d.alt ? 0 : 1);
  });
}
