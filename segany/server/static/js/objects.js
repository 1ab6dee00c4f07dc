// Saved objects: loading them for the open image and the object list (visibility, relabel, delete).
import { S, $, fail, escapeHtml } from "./state.js";
import { api } from "./api.js";
import { render, labelColor } from "./view.js";

export function currentLabelId() { const v = $("label-select").value; return v ? Number(v) : null; }

export async function loadAnnotations() {
  if (!S.image) return;
  const imageId = S.image.id;
  const out = await api("GET", `/api/images/${imageId}/annotations`);
  if (!S.image || S.image.id !== imageId) return;
  const known = new Map(S.annotations.map((a) => [a.id, a.version]));
  S.annotations = out.annotations;
  for (const a of S.annotations) if (known.get(a.id) !== a.version) S.annCanvas.delete(a.id);
  renderObjects(); render();
}

export function renderObjects() {
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
