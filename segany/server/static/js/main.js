// segany annotator: the entry module (no build step). Projects, labels, images, keys, buttons, start.
import { S, $, status, fail, escapeHtml, modelLevels } from "./state.js";
import { api, getUser, setUser, withToken } from "./api.js";
import { render, fitView, resizeCanvas, zoomAt, canvas } from "./view.js";
import { initDecoder, modelQuery, prefetch, serverForced, setModel, setServerForced } from "./decode.js";
import { loadAnnotations, renderObjects } from "./objects.js";
import { accept, bindMouse, clearWork, keys, redo, selectCandidate, setLevel, setTool, undo } from "./tools.js";
import { acceptAbove, acceptProposal, disableFind, rejectProposal, renderProposals, runFind, runProposals } from "./proposals.js";

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
  api("POST", `/api/images/${id}/embedding${modelQuery()}`).catch(() => {});  // compute this one next
  prefetch(im);  // and bring it into the page when it decodes here
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

// ------------------------------------------------------------------ keyboard

window.addEventListener("keydown", async (e) => {
  if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") { if (e.key === "Escape") e.target.blur(); return; }
  const k = e.key;
  if (k === " ") { keys.space = true; e.preventDefault(); return; }
  if ((e.ctrlKey || e.metaKey) && (k === "z" || k === "Z")) { e.preventDefault(); if (e.shiftKey) await redo(); else await undo(); return; }
  if ((e.ctrlKey || e.metaKey) && k === "y") { e.preventDefault(); await redo(); return; }
  if (e.ctrlKey || e.metaKey) return;
  if (k === "Enter") { e.preventDefault(); await accept(); }
  else if (k === "Escape") clearWork();
  else if (/^[1-6]$/.test(k)) selectCandidate(Number(k) - 1);
  else if ((k === "," || k === ".") && modelLevels()) setLevel(S.level + (k === "." ? 1 : -1));
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
window.addEventListener("keyup", (e) => { if (e.key === " ") keys.space = false; });

// ------------------------------------------------------------------ buttons

bindMouse();
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
$("find-run").onclick = runFind;
$("find-text").onkeydown = (e) => { if (e.key === "Enter") runFind(); };
$("force-server").checked = serverForced();
$("force-server").onchange = (e) => { setServerForced(e.target.checked).then(() => { if (S.image) prefetch(S.image); }); };
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
    status(`imported ${out.added.length}, already there ${out.existing.length}, rejected ${out.rejected.length}`);
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
$("level").oninput = (e) => setLevel(Number(e.target.value));
$("model-picker").onchange = (e) => pickModel(e.target.value);

// The model picker: the server's models (/api/info); the choice is kept across reloads.
const MODEL_KEY = "segany.model";
function renderModels() {
  const picker = $("model-picker");
  picker.innerHTML = "";
  for (const m of S.models) {
    const o = document.createElement("option");
    o.value = m.name;
    const short = m.name.split(/[\\/]/).pop();
    o.textContent = short + (m.levels ? ` (levels 1-${m.levels})` : "") + (m.error ? " (failed)" : "");
    o.title = m.error || m.name;
    picker.appendChild(o);
  }
  picker.value = S.model;
  picker.disabled = S.models.length < 2;
  $("level-control").hidden = !modelLevels();
  $("level").max = String(modelLevels() || 6);
  $("model-name").textContent = "";
}

async function pickModel(name) {
  if (!S.models.some((m) => m.name === name)) name = S.models.length ? S.models[0].name : null;
  clearWork(false);
  S.model = name;
  localStorage.setItem(MODEL_KEY, name || "");
  status(`loading model ${name}...`);
  S.decoderReady = setModel(name).then(async () => {
    S.models = (await api("GET", "/api/info")).models || S.models;  // the model is loaded now: its family and levels
    renderModels();
    if (S.image) {
      api("POST", `/api/images/${S.image.id}/embedding${modelQuery()}`).catch(() => {});
      prefetch(S.image);
    }
    status(`model ${name}` + (modelLevels() ? `: one click, ${modelLevels()} granularity levels` : ""));
  }).catch(fail);
  await S.decoderReady;
}

$("user-name").value = getUser();
$("user-name").onchange = (e) => { e.target.value = setUser(e.target.value); };

window.addEventListener("resize", resizeCanvas);
(async function start() {
  resizeCanvas();
  try {
    const info = await api("GET", "/api/info");
    $("model-name").textContent = info.model;
    S.models = info.models || [{ name: info.model, default: true, levels: 0 }];
    const kept = localStorage.getItem(MODEL_KEY);
    S.model = S.models.some((m) => m.name === kept) ? kept : S.models[0].name;
    renderModels();
    // The find box needs the server's text model (a later server says so in /api/info).
    const text = info.text_model !== undefined ? info.text_model : info.text_prompts;
    if (text === false || text === null) disableFind("this server has no text model");
    // The decoder starts beside the project loading; clicks go to the server until it is ready.
    S.decoderReady = (S.model === S.models[0].name ? initDecoder() : pickModel(S.model))
      .then(() => { if (S.image) prefetch(S.image); });
    await loadProjects();
  } catch (err) { fail(err); }
  poll();
})();
