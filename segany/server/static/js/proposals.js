// Everything-mode proposals and text "find" matches: masks offered to accept (A) or reject (R).
import { S, $, status, fail } from "./state.js";
import { api } from "./api.js";
import { render } from "./view.js";
import { toast } from "./tools.js";
import { currentLabelId, loadAnnotations } from "./objects.js";

// A proposal's score is its predicted IoU; a text match's is its match score.
const scoreOf = (p) => (p.score != null ? p.score : p.predicted_iou);

function show(items, kind) {
  S.proposals = items; S.propIndex = 0; S.proposalKind = kind;
  renderProposals(); render();
}

export async function runProposals() {
  if (!S.image) return;
  status("computing proposals...");
  try {
    const grid = Math.max(2, Math.min(64, Number($("prop-grid").value) || 16));
    const num = (id, dflt) => { const v = Number($(id).value); return Number.isFinite(v) ? Math.max(0, Math.min(1, v)) : dflt; };
    const out = await api("POST", `/api/images/${S.image.id}/proposals`, {
      points_per_side: grid, pred_iou_thresh: num("prop-iou", 0.88), stability_score_thresh: num("prop-stability", 0.95) });
    show(out.proposals, "proposals");
    status(`${S.proposals.length} proposals in ${out.seconds.toFixed(1)} s`);
  } catch (err) { fail(err); renderProposals(); render(); }
}

// The find box: text prompts, when the server has a text model.
export function disableFind(reason) {
  $("find-text").disabled = true; $("find-run").disabled = true;
  $("find-note").textContent = reason;
}

export async function runFind() {
  const text = $("find-text").value.trim();
  if (!S.image || !text) return;
  status(`finding "${text}"...`);
  try {
    const topK = Math.max(1, Math.min(50, Number($("find-top").value) || 5));
    const out = await api("POST", `/api/images/${S.image.id}/find`, { text, top_k: topK });
    show(out.matches, "matches");
    status(`${S.proposals.length} matches for "${text}" in ${Number(out.seconds).toFixed(1)} s`);
  } catch (err) {
    // No such endpoint, or a server without a text model: say so and disable the box. A 422 is about
    // this request's text or numbers, so the box stays for the next try.
    if (err.status === 501 || (err.status >= 400 && err.status < 500 && err.status !== 422 && err.status !== 429)) {
      disableFind(`text prompts unavailable: ${err.message}`);
    }
    fail(err);
  }
}

export function renderProposals() {
  const list = $("proposal-list");
  list.innerHTML = "";
  const what = S.proposalKind === "matches" ? "match" : "score";
  S.proposals.forEach((p, i) => {
    const li = document.createElement("li");
    li.className = i === S.propIndex ? "current" : "";
    li.textContent = `${what} ${scoreOf(p).toFixed(3)}, ${p.area}px`;
    li.onclick = () => { S.propIndex = i; renderProposals(); render(); };
    list.appendChild(li);
  });
  $("prop-info").textContent = S.proposals.length ? `${S.propIndex + 1}/${S.proposals.length}` : "";
}

async function saveProposals(items) {
  if (!items.length) return;
  const label = currentLabelId();
  await api("POST", `/api/images/${S.image.id}/annotations`, { annotations: items.map((p) => ({
    segmentation: p.segmentation, label_id: label, score: scoreOf(p), source: "proposal",
    meta: { point_coords: p.point_coords, stability_score: p.stability_score, crop_box: p.crop_box,
            ...(p.score != null ? { predicted_iou: p.predicted_iou, text_score: p.score } : {}) } })) });
  const gone = new Set(items);
  S.proposals = S.proposals.filter((p) => !gone.has(p));
  S.propIndex = Math.min(S.propIndex, Math.max(0, S.proposals.length - 1));
  toast(`saved ${items.length}`);
  renderProposals(); await loadAnnotations();
}

export async function acceptProposal() { const p = S.proposals[S.propIndex]; if (p) try { await saveProposals([p]); } catch (err) { fail(err); } }
export function rejectProposal() {
  if (!S.proposals.length) return;
  S.proposals.splice(S.propIndex, 1);
  S.propIndex = Math.min(S.propIndex, Math.max(0, S.proposals.length - 1));
  renderProposals(); render();
}
export async function acceptAbove() {
  const t = Number($("accept-threshold").value);
  try { await saveProposals(S.proposals.filter((p) => scoreOf(p) >= t)); } catch (err) { fail(err); }
}
