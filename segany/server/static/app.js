// segany annotator: plain JavaScript, no build step. Talks to the FastAPI server under /api.
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  user: localStorage.getItem("segany.user") || "annotator",
  project: null, images: [], labels: [], image: null, img: null,
  view: { scale: 1, ox: 0, oy: 0 },
  points: [], box: null,           // prompts in image pixels
  candidates: [], selected: 0, token: null,
  work: null, workSource: null,    // the mask being edited (Uint8Array h*w, row-major)
  edits: null,                     // hand edits (Int8Array h*w: 1 painted, -1 erased), kept across new decodes
  tool: "prompt", brush: 10,
  annotations: [], hidden: new Set(), annCanvas: new Map(), highlight: null, allHidden: false,
  proposals: [], propIndex: 0,
  undo: [], redo: [],
  revision: -1, decodeSeq: 0, busy: false,
  lastTiming: null, timings: [],
  shownImage: null,                // id of the image whose picture and stored objects are both on screen
};
window.segany = S;  // for tests and the console

// ------------------------------------------------------------------ HTTP

// The access token comes once in the URL that `segany serve` printed (#token=...; a fragment never
// reaches a server or a log); it is kept for this tab in sessionStorage and taken out of the address bar.
const TOKEN = (() => {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("segany.token", fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return fromHash || sessionStorage.getItem("segany.token") || "";
})();

// A GET URL that carries the token (for <img src> and downloads, which cannot send headers).
function withToken(url) {
  return TOKEN ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}` : url;
}

async function api(method, path, body, isForm) {
  const opts = { method, headers: { "X-User": S.user } };
  if (TOKEN) opts.headers["Authorization"] = `Bearer ${TOKEN}`;
  if (body !== undefined) {
    if (isForm) opts.body = body;
    else { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  }
  const res = await fetch(path, opts);
  let data = null;
  const text = await res.text();
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!res.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : res.statusText;
    throw new Error(`${res.status}: ${detail}`);
  }
  return data;
}

function status(text) { $("status").textContent = text; }
function fail(err) { console.error(err); status("error: " + err.message); }

// ------------------------------------------------------------------ COCO RLE (column-major runs)

function rleRuns(counts) {
  // COCO compressed counts string -> run lengths (pycocotools' rleFrString).
  const runs = [];
  let p = 0;
  while (p < counts.length) {
    let x = 0, k = 0, more = 1, c = 0;
    while (more) {
      c = counts.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20; p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (runs.length > 2) x += runs[runs.length - 2];
    runs.push(x);
  }
  return runs;
}

function decodeRle(seg) {
  const [h, w] = seg.size;
  const runs = typeof seg.counts === "string" ? rleRuns(seg.counts) : seg.counts;
  const mask = new Uint8Array(h * w);
  let idx = 0, v = 0;
  for (const r of runs) {
    if (v) for (let i = idx; i < idx + r; i++) { const x = (i / h) | 0, y = i - x * h; mask[y * w + x] = 1; }
    idx += r; v ^= 1;
  }
  return mask;
}

function encodeRle(mask, h, w) {
  // Uncompressed COCO RLE (column-major), which the server compresses.
  const runs = [];
  let v = 0, n = 0;
  for (let x = 0; x < w; x++) for (let y = 0; y < h; y++) {
    const m = mask[y * w + x];
    if (m !== v) { runs.push(n); n = 0; v = m; }
    n++;
  }
  runs.push(n);
  return { size: [h, w], counts: runs };
}

// ------------------------------------------------------------------ mask drawing

function hexRgb(hex) { const n = parseInt(hex.slice(1), 16); return [(n >> 16) & 255, (n >> 8) & 255, n & 255]; }

function maskCanvas(mask, w, h, rgb, fillAlpha, outlineAlpha) {
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  const im = ctx.createImageData(w, h);
  const d = im.data;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const i = y * w + x;
    if (!mask[i]) continue;
    const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w];
    const a = edge ? outlineAlpha : fillAlpha;
    if (!a) continue;
    d[4 * i] = rgb[0]; d[4 * i + 1] = rgb[1]; d[4 * i + 2] = rgb[2]; d[4 * i + 3] = a;
  }
  ctx.putImageData(im, 0, 0);
  return c;
}

function labelColor(labelId) {
  const l = S.labels.find((x) => x.id === labelId);
  return l ? l.color : "#9ca3af";
}

// ------------------------------------------------------------------ view

const canvas = $("canvas");
const ctx = canvas.getContext("2d");

function resizeCanvas() {
  const r = canvas.getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(r.width));
  canvas.height = Math.max(1, Math.round(r.height));
  render();
}

function fitView() {
  if (!S.image) return;
  const s = Math.min(canvas.width / S.image.width, canvas.height / S.image.height) * 0.95;
  S.view = { scale: s, ox: (canvas.width - S.image.width * s) / 2, oy: (canvas.height - S.image.height * s) / 2 };
  render();
}

function toImage(ev) {
  const r = canvas.getBoundingClientRect();
  const sx = ev.clientX - r.left, sy = ev.clientY - r.top;
  return { x: (sx - S.view.ox) / S.view.scale, y: (sy - S.view.oy) / S.view.scale, sx, sy };
}

function zoomAt(sx, sy, factor) {
  const v = S.view;
  const s = Math.min(64, Math.max(0.02, v.scale * factor));
  v.ox = sx - ((sx - v.ox) * s) / v.scale;
  v.oy = sy - ((sy - v.oy) * s) / v.scale;
  v.scale = s;
  render();
}

let workCanvas = null, brushCursor = null, dragBox = null;

function refreshWorkCanvas() {
  workCanvas = S.work && S.image ? maskCanvas(S.work, S.image.width, S.image.height, [37, 99, 235], 120, 255) : null;
}

function render() {
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
  const box = dragBox || S.box;
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
  if (brushCursor && S.tool !== "prompt") {
    ctx.beginPath();
    ctx.arc(brushCursor.sx, brushCursor.sy, S.brush * v.scale, 0, 2 * Math.PI);
    ctx.strokeStyle = S.tool === "brush" ? "#60a5fa" : "#f87171"; ctx.lineWidth = 1.5; ctx.stroke();
  }
}

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
function pushUndo(entry) {
  S.undo.push(entry || { kind: "state", state: snapshot() });
  if (S.undo.length > 40) S.undo.shift();
  S.redo = [];
  updateButtons();
}
async function undo() {
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
async function redo() {
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

async function decode() {
  if (!S.image) return;
  if (!S.points.length && !S.box) { S.candidates = []; S.work = null; refreshWorkCanvas(); renderCandidates(); render(); return; }
  const seq = ++S.decodeSeq;
  const body = { points: S.points.map((p) => [p.x, p.y]), labels: S.points.map((p) => p.label), multimask: true };
  if (S.box) body.box = [S.box.x0, S.box.y0, S.box.x1, S.box.y1];
  if (S.token && S.candidates.length && S.points.length > 1) body.mask_input = { token: S.token, index: S.selected };
  const t0 = performance.now();
  const embStatus = (S.images.find((i) => i.id === S.image.id) || {}).embedding;
  status(embStatus === "ready" ? "decoding..." : "waiting for the image embedding...");
  let out;
  try { out = await api("POST", `/api/images/${S.image.id}/decode`, body); }
  catch (err) { if (seq === S.decodeSeq) fail(err); return; }
  if (seq !== S.decodeSeq) return;  // a newer prompt is on its way
  const h = S.image.height, w = S.image.width;
  S.candidates = out.candidates.map((c) => ({ ...c, mask: decodeRle(c.segmentation) }));
  S.token = out.token;
  S.selected = out.best;
  selectCandidate(out.best, false);
  const t1 = performance.now();
  S.lastTiming = { server_ms: out.timing_ms.decode, server_total_ms: out.timing_ms.total, round_trip_ms: t1 - t0 };
  S.timings.push(S.lastTiming);
  status(`${S.candidates.length} candidates; decode ${out.timing_ms.decode.toFixed(0)} ms on the server, ` +
         `${(t1 - t0).toFixed(0)} ms round trip (${w}x${h})`);
}

function selectCandidate(i, undoable = true) {
  if (i < 0 || i >= S.candidates.length) return;
  if (undoable) pushUndo();
  S.selected = i;
  S.work = withEdits(S.candidates[i].mask);
  S.workSource = S.edits ? "brush" : S.box && !S.points.length ? "box" : "click";
  refreshWorkCanvas(); renderCandidates(); render();
}

function renderCandidates() {
  const box = $("candidates");
  box.innerHTML = "";
  S.candidates.forEach((c, i) => {
    const el = document.createElement("div");
    el.className = "candidate" + (i === S.selected && S.workSource !== "brush" ? " selected" : "");
    el.dataset.index = i;
    const thumb = maskCanvas(c.mask, S.image.width, S.image.height, [37, 99, 235], 255, 255);
    el.appendChild(thumb);
    const label = document.createElement("div");
    label.textContent = `${i + 1}: ${c.score.toFixed(3)}`;
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

function updateButtons() {
  $("accept").disabled = !S.work;
  $("undo").disabled = !S.undo.length;
  $("redo").disabled = !S.redo.length;
}

function clearWork(undoable = true) {
  if (undoable && (S.points.length || S.box || S.work)) pushUndo();
  S.points = []; S.box = null; S.candidates = []; S.token = null; S.work = null; S.workSource = null; S.edits = null;
  S.decodeSeq++;
  refreshWorkCanvas(); renderCandidates(); render();
}

// ------------------------------------------------------------------ accepting and the object list

function currentLabelId() { const v = $("label-select").value; return v ? Number(v) : null; }

async function accept() {
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

function toast(text) {
  const t = $("saved-toast");
  t.textContent = text; t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 1200);
}

async function loadAnnotations() {
  if (!S.image) return;
  const imageId = S.image.id;
  const out = await api("GET", `/api/images/${imageId}/annotations`);
  if (!S.image || S.image.id !== imageId) return;
  const known = new Map(S.annotations.map((a) => [a.id, a.version]));
  S.annotations = out.annotations;
  for (const a of S.annotations) if (known.get(a.id) !== a.version) S.annCanvas.delete(a.id);
  renderObjects(); render();
}

function renderObjects() {
  const list = $("object-list");
  list.innerHTML = "";
  for (const a of S.annotations) {
    const li = document.createElement("li");
    li.dataset.id = a.id;
    if (a.id === S.highlight) li.className = "highlight";
    const vis = document.createElement("input");
    vis.type = "checkbox"; vis.checked = !S.hidden.has(a.id); vis.title = "visible"; vis.className = "visible";
    vis.onchange = () => { if (vis.checked) S.hidden.delete(a.id); else S.hidden.add(a.id); render(); };
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = labelColor(a.label_id);
    const name = document.createElement("span");
    name.textContent = `#${a.id}`; name.style.cursor = "pointer";
    name.onclick = () => { S.highlight = S.highlight === a.id ? null : a.id; S.annCanvas.clear(); renderObjects(); render(); };
    const sel = document.createElement("select");
    sel.className = "relabel";
    sel.innerHTML = `<option value="">(none)</option>` + S.labels.map((l) => `<option value="${l.id}">${escapeHtml(l.name)}</option>`).join("");
    sel.value = a.label_id == null ? "" : String(a.label_id);
    sel.onchange = async () => {
      const body = sel.value ? { label_id: Number(sel.value), version: a.version } : { clear_label: true, version: a.version };
      try { await api("PATCH", `/api/annotations/${a.id}`, body); } catch (err) { fail(err); }
      await loadAnnotations();
    };
    const info = document.createElement("span");
    info.className = "muted"; info.textContent = `${a.area}px ${a.created_by}`;
    const del = document.createElement("button");
    del.className = "small delete"; del.textContent = "x"; del.title = "delete";
    del.onclick = async () => { try { await api("DELETE", `/api/annotations/${a.id}`); } catch (err) { fail(err); } await loadAnnotations(); };
    li.append(vis, sw, name, sel, info, del);
    list.appendChild(li);
  }
}

function escapeHtml(s) { return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

// ------------------------------------------------------------------ proposals (everything mode)

async function runProposals() {
  if (!S.image) return;
  status("computing proposals...");
  try {
    const grid = Math.max(2, Math.min(64, Number($("prop-grid").value) || 16));
    const num = (id, dflt) => { const v = Number($(id).value); return Number.isFinite(v) ? Math.max(0, Math.min(1, v)) : dflt; };
    const out = await api("POST", `/api/images/${S.image.id}/proposals`, {
      points_per_side: grid, pred_iou_thresh: num("prop-iou", 0.88), stability_score_thresh: num("prop-stability", 0.95) });
    S.proposals = out.proposals; S.propIndex = 0;
    status(`${S.proposals.length} proposals in ${out.seconds.toFixed(1)} s`);
  } catch (err) { fail(err); }
  renderProposals(); render();
}

function renderProposals() {
  const list = $("proposal-list");
  list.innerHTML = "";
  S.proposals.forEach((p, i) => {
    const li = document.createElement("li");
    li.className = i === S.propIndex ? "current" : "";
    li.textContent = `score ${p.predicted_iou.toFixed(3)}, ${p.area}px`;
    li.onclick = () => { S.propIndex = i; renderProposals(); render(); };
    list.appendChild(li);
  });
  $("prop-info").textContent = S.proposals.length ? `${S.propIndex + 1}/${S.proposals.length}` : "";
}

async function saveProposals(items) {
  if (!items.length) return;
  const label = currentLabelId();
  await api("POST", `/api/images/${S.image.id}/annotations`, { annotations: items.map((p) => ({
    segmentation: p.segmentation, label_id: label, score: p.predicted_iou, source: "proposal",
    meta: { point_coords: p.point_coords, stability_score: p.stability_score, crop_box: p.crop_box } })) });
  const gone = new Set(items);
  S.proposals = S.proposals.filter((p) => !gone.has(p));
  S.propIndex = Math.min(S.propIndex, Math.max(0, S.proposals.length - 1));
  toast(`saved ${items.length}`);
  renderProposals(); await loadAnnotations();
}

async function acceptProposal() { const p = S.proposals[S.propIndex]; if (p) try { await saveProposals([p]); } catch (err) { fail(err); } }
function rejectProposal() {
  if (!S.proposals.length) return;
  S.proposals.splice(S.propIndex, 1);
  S.propIndex = Math.min(S.propIndex, Math.max(0, S.proposals.length - 1));
  renderProposals(); render();
}
async function acceptAbove() {
  const t = Number($("accept-threshold").value);
  try { await saveProposals(S.proposals.filter((p) => p.predicted_iou >= t)); } catch (err) { fail(err); }
}

// ------------------------------------------------------------------ projects, labels, images

async function loadProjects(selectId) {
  const projects = await api("GET", "/api/projects");
  const sel = $("project-select");
  sel.innerHTML = projects.map((p) => `<option value="${p.id}">${escapeHtml(p.name)}</option>`).join("");
  const want = selectId || Number(new URLSearchParams(location.search).get("project")) || (projects[0] && projects[0].id);
  if (want && projects.some((p) => p.id === want)) { sel.value = String(want); await openProject(want); }
}

async function openProject(id) {
  S.project = { id };
  S.image = null; S.img = null; S.annotations = []; S.proposals = []; clearWork(false);
  await loadLabels();
  await loadImages();
  const want = Number(new URLSearchParams(location.search).get("image"));
  const first = S.images.find((i) => i.id === want) || S.images[0];
  updateUrl();
  if (first) await openImage(first.id);
  else { render(); status("add images: upload or import a folder"); }
}

async function loadLabels() {
  S.labels = await api("GET", `/api/projects/${S.project.id}/labels`);
  const sel = $("label-select");
  const keep = sel.value;
  sel.innerHTML = `<option value="">(none)</option>` + S.labels.map((l) => `<option value="${l.id}">${escapeHtml(l.name)}</option>`).join("");
  if (S.labels.some((l) => String(l.id) === keep)) sel.value = keep;
}

async function loadImages() {
  const out = await api("GET", `/api/projects/${S.project.id}/images`);
  S.images = out.images;
  const p = out.progress;
  $("progress-bar").style.width = p.total ? `${(100 * p.ready) / p.total}%` : "0";
  $("progress-text").textContent = p.total ? `embeddings ${p.ready}/${p.total}` +
    (p.ready < p.total && p.seconds_per_image ? ` (~${Math.ceil((p.total - p.ready) * p.seconds_per_image)} s left)` : "") : "no images";
  const list = $("image-list");
  list.innerHTML = "";
  for (const im of S.images) {
    const li = document.createElement("li");
    li.dataset.id = im.id;
    if (S.image && S.image.id === im.id) li.className = "current";
    const name = document.createElement("span");
    name.textContent = im.file_name;
    const badge = document.createElement("span");
    badge.className = `badge ${im.embedding}`;
    badge.textContent = `${im.embedding} · ${im.num_annotations}`;
    li.append(name, badge);
    li.onclick = () => openImage(im.id);
    list.appendChild(li);
  }
  return out;
}

async function openImage(id) {
  const im = S.images.find((i) => i.id === id);
  if (!im) return;
  S.image = im; S.shownImage = null; S.annotations = []; S.annCanvas.clear(); S.hidden.clear(); S.highlight = null;
  S.proposals = []; S.undo = []; S.redo = []; renderProposals(); clearWork(false);
  for (const li of $("image-list").children) li.className = Number(li.dataset.id) === id ? "current" : "";
  updateUrl();
  api("POST", `/api/images/${id}/embedding`).catch(() => {});  // compute this one next
  const img = new Image();
  img.src = withToken(im.url);
  await img.decode().catch(() => {});
  if (!S.image || S.image.id !== id) return;
  S.img = img;
  fitView();
  await loadAnnotations();
  if (S.image && S.image.id === id) S.shownImage = id;
  status(`${im.file_name} (${im.width}x${im.height}), embedding ${im.embedding}`);
}

function updateUrl() {
  const q = new URLSearchParams();
  if (S.project) q.set("project", S.project.id);
  if (S.image) q.set("image", S.image.id);
  history.replaceState(null, "", `?${q}`);
}

// Another tab's saves: poll the project's change counter.
async function poll() {
  if (S.project) {
    try {
      const { revision } = await api("GET", `/api/projects/${S.project.id}/revision`);
      const pending = S.images.some((i) => i.embedding !== "ready" && i.embedding !== "error");
      if (revision !== S.revision) {
        S.revision = revision;
        await loadLabels(); await loadImages(); await loadAnnotations();
      } else if (pending) await loadImages();
    } catch (err) { /* the server may be restarting: try again next time */ }
  }
  setTimeout(poll, 1000);
}

// ------------------------------------------------------------------ mouse and keyboard

let drag = null, spaceDown = false;

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

canvas.addEventListener("contextmenu", (e) => e.preventDefault());
canvas.addEventListener("mousedown", (e) => {
  if (!S.image) return;
  const pt = toImage(e);
  if (e.button === 1 || spaceDown) { drag = { pan: true, sx: pt.sx, sy: pt.sy }; e.preventDefault(); return; }
  if (e.button === 2) { addPoint(pt, 0); return; }
  if (e.button !== 0) return;
  if (S.tool !== "prompt") { pushUndo(); drag = { paint: true }; paint(pt); return; }
  drag = { start: pt, alt: e.altKey };
});
window.addEventListener("mousemove", (e) => {
  const pt = toImage(e);
  brushCursor = pt;
  if (!drag) { if (S.tool !== "prompt") render(); return; }
  if (drag.pan) { S.view.ox += pt.sx - drag.sx; S.view.oy += pt.sy - drag.sy; drag.sx = pt.sx; drag.sy = pt.sy; render(); return; }
  if (drag.paint) { paint(pt); return; }
  if (Math.hypot(pt.sx - drag.start.sx, pt.sy - drag.start.sy) > 5) {
    dragBox = { x0: Math.min(drag.start.x, pt.x), y0: Math.min(drag.start.y, pt.y), x1: Math.max(drag.start.x, pt.x), y1: Math.max(drag.start.y, pt.y) };
    render();
  }
});
window.addEventListener("mouseup", (e) => {
  if (!drag) return;
  const d = drag; drag = null;
  if (d.pan || d.paint) { renderCandidates(); return; }
  const pt = toImage(e);
  if (dragBox) {
    const clip = (v, hi) => Math.max(0, Math.min(hi, v));
    const b = { x0: clip(dragBox.x0, S.image.width), y0: clip(dragBox.y0, S.image.height), x1: clip(dragBox.x1, S.image.width), y1: clip(dragBox.y1, S.image.height) };
    dragBox = null;
    if (b.x1 - b.x0 >= 1 && b.y1 - b.y0 >= 1) { pushUndo(); S.box = b; decode(); }
    render();
    return;
  }
  addPoint(d.start, d.alt ? 0 : 1);
});

function addPoint(pt, label) {
  if (pt.x < 0 || pt.y < 0 || pt.x > S.image.width || pt.y > S.image.height) { status("click inside the image"); return; }
  pushUndo();
  S.points.push({ x: Math.round(pt.x * 10) / 10, y: Math.round(pt.y * 10) / 10, label });
  render();
  decode();
}

canvas.addEventListener("wheel", (e) => { e.preventDefault(); const pt = toImage(e); zoomAt(pt.sx, pt.sy, e.deltaY < 0 ? 1.2 : 1 / 1.2); }, { passive: false });

function setTool(tool) {
  S.tool = tool;
  for (const b of document.querySelectorAll("button.tool")) b.classList.toggle("active", b.dataset.tool === tool);
  canvas.style.cursor = tool === "prompt" ? "crosshair" : "none";
  render();
}

window.addEventListener("keydown", async (e) => {
  if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") { if (e.key === "Escape") e.target.blur(); return; }
  const k = e.key;
  if (k === " ") { spaceDown = true; e.preventDefault(); return; }
  if ((e.ctrlKey || e.metaKey) && (k === "z" || k === "Z")) { e.preventDefault(); if (e.shiftKey) await redo(); else await undo(); return; }
  if ((e.ctrlKey || e.metaKey) && k === "y") { e.preventDefault(); await redo(); return; }
  if (e.ctrlKey || e.metaKey) return;
  if (k === "Enter") { e.preventDefault(); await accept(); }
  else if (k === "Escape") clearWork();
  else if (k === "1" || k === "2" || k === "3") selectCandidate(Number(k) - 1);
  else if (k === "v" || k === "V") setTool("prompt");
  else if (k === "b" || k === "B") setTool("brush");
  else if (k === "e" || k === "E") setTool("eraser");
  else if (k === "[") { S.brush = Math.max(1, S.brush - 2); $("brush-size").value = S.brush; render(); }
  else if (k === "]") { S.brush = Math.min(80, S.brush + 2); $("brush-size").value = S.brush; render(); }
  else if (k === "+" || k === "=") zoomAt(canvas.width / 2, canvas.height / 2, 1.25);
  else if (k === "-") zoomAt(canvas.width / 2, canvas.height / 2, 0.8);
  else if (k === "0") fitView();
  else if (k === "l" || k === "L") cycleLabel();
  else if (k === "h" || k === "H") toggleAll();
  else if (k === "p" || k === "P") await runProposals();
  else if (k === "a" || k === "A") await acceptProposal();
  else if (k === "r" || k === "R") rejectProposal();
  else if (k === "n" || k === "N") nextImage(e.shiftKey ? -1 : 1);
});
window.addEventListener("keyup", (e) => { if (e.key === " ") spaceDown = false; });

function cycleLabel() {
  const sel = $("label-select");
  if (sel.options.length) sel.selectedIndex = (sel.selectedIndex + 1) % sel.options.length;
}
function toggleAll() { S.allHidden = !S.allHidden; render(); }
function nextImage(step) {
  if (!S.images.length) return;
  const i = S.images.findIndex((im) => S.image && im.id === S.image.id);
  openImage(S.images[(i + step + S.images.length) % S.images.length].id);
}

// ------------------------------------------------------------------ buttons

for (const b of document.querySelectorAll("button.tool")) b.onclick = () => setTool(b.dataset.tool);
$("brush-size").oninput = (e) => { S.brush = Number(e.target.value); };
$("undo").onclick = undo;
$("redo").onclick = redo;
$("fit").onclick = fitView;
$("accept").onclick = accept;
$("clear").onclick = () => clearWork();
$("toggle-all").onclick = toggleAll;
$("run-proposals").onclick = runProposals;
$("prop-accept").onclick = acceptProposal;
$("prop-reject").onclick = rejectProposal;
$("accept-above").onclick = acceptAbove;
$("project-select").onchange = (e) => { history.replaceState(null, "", "?"); openProject(Number(e.target.value)); };
$("new-project").onclick = async () => {
  const name = $("new-project-name").value.trim();
  if (!name) return;
  try { const p = await api("POST", "/api/projects", { name }); $("new-project-name").value = ""; history.replaceState(null, "", "?"); await loadProjects(p.id); }
  catch (err) { fail(err); }
};
$("add-label").onclick = async () => {
  const name = $("new-label").value.trim();
  if (!name || !S.project) return;
  try { const l = await api("POST", `/api/projects/${S.project.id}/labels`, { name }); $("new-label").value = ""; await loadLabels(); $("label-select").value = String(l.id); renderObjects(); }
  catch (err) { fail(err); }
};
$("upload").onchange = async (e) => {
  if (!S.project || !e.target.files.length) return;
  const form = new FormData();
  for (const f of e.target.files) form.append("files", f, f.name);
  status("uploading...");
  try {
    const out = await api("POST", `/api/projects/${S.project.id}/images`, form, true);
    await loadImages();
    status(`uploaded ${out.images.length} image(s)`);
    if (!S.image && S.images.length) await openImage(S.images[0].id);
  } catch (err) { fail(err); }
  e.target.value = "";
};
$("import-folder").onclick = async () => {
  const folder = $("folder-path").value.trim();
  if (!folder || !S.project) return;
  try {
    const out = await api("POST", `/api/projects/${S.project.id}/import-folder`, { folder });
    await loadImages();
    status(`imported ${out.added.length}, already there ${out.existing.length}, rejected ${out.rejected.length}, skipped ${out.skipped || 0} other files`);
    if (!S.image && S.images.length) await openImage(S.images[0].id);
  } catch (err) { fail(err); }
};
$("export-coco").onclick = () => { if (S.project) location.href = withToken(`/api/projects/${S.project.id}/export/coco`); };
$("export-sa1b").onclick = async () => {
  if (!S.image) return;
  try {
    const data = await api("GET", `/api/images/${S.image.id}/export/sa1b`);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([JSON.stringify(data)], { type: "application/json" }));
    a.download = `${S.image.file_name.replace(/\.[^.]+$/, "")}.json`;
    a.click();
  } catch (err) { fail(err); }
};
$("user-name").value = S.user;
$("user-name").onchange = (e) => { S.user = e.target.value.trim() || "annotator"; localStorage.setItem("segany.user", S.user); };

window.addEventListener("resize", resizeCanvas);
(async function start() {
  resizeCanvas();
  try {
    const info = await api("GET", "/api/info");
    $("model-name").textContent = info.model;
    await loadProjects();
  } catch (err) { fail(err); }
  poll();
})();
