// The page's state, one object, exposed as window.segany for tests and the console.

export const S = {
  project: null, images: [], labels: [], image: null, img: null,
  view: { scale: 1, ox: 0, oy: 0 },
  points: [], box: null,           // prompts in image pixels
  candidates: [], selected: 0, token: null,  // candidates: {score, mask, lowRes?}; token: the server's logits reference
  work: null, workSource: null,    // the mask being edited (Uint8Array h*w, row-major)
  edits: null,                     // hand edits (Int8Array h*w: 1 painted, -1 erased), kept across new decodes
  tool: "prompt", brush: 10,
  annotations: [], hidden: new Set(), annCanvas: new Map(), highlight: null, allHidden: false,
  proposals: [], propIndex: 0, proposalKind: "proposals",
  undo: [], redo: [],
  revision: -1, decodeSeq: 0, busy: false,
  lastTiming: null, timings: [],
  decoder: { mode: "server", reason: "starting", threads: 0 },  // which decoder runs, and why
  model: null, models: [],         // the model that decodes (a name from /api/info's models) and the offered ones
  level: 3,                        // granularity level shown for multi-granularity models (Semantic-SAM)
  lastDecode: null,                // the last in-page decode's raw outputs (logits), for tests
  shownImage: null,                // id of the image whose picture and stored objects are both on screen
};
window.segany = S;

export const $ = (id) => document.getElementById(id);
// Granularity levels of the picked model (Semantic-SAM: 6; SAM-family models: 0).
export function modelLevels() { const m = S.models.find((x) => x.name === S.model); return (m && m.levels) || 0; }
export function status(text) { $("status").textContent = text; }
export function fail(err) { console.error(err); status("error: " + err.message); }
export function escapeHtml(s) { return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
