// Masks for a prompt: in the page with ONNX Runtime Web (WebAssembly) running the model's ONNX decoder
// on the image embedding the server computed once, or, as a fallback, by the server's /decode.
// The page falls back when the model has no exportable decoder (HQ-SAM), when the browser has no
// WebAssembly, when ONNX Runtime Web fails to start, or when the user asks for server decoding.
import { S, $ } from "./state.js";
import { api, cachedBytes } from "./api.js";
import { decodeRle } from "./rle.js";
import { upscaler } from "./upscale.js";

const VENDOR = "/static/vendor/onnxruntime-web/";
const FORCE_KEY = "segany.forceServerDecode";
const KEEP_EMBEDDINGS = 4;  // images whose embeddings stay in the page's memory
let ort = null, session = null, decoderInfo = null;
const sessions = new Map();  // decoder key -> InferenceSession (one per model the annotator picked)
const embeddings = new Map();  // image id -> Promise of { tensor, originalSize, inputSize, fromCache }

export function serverForced() { return localStorage.getItem(FORCE_KEY) === "1"; }

function showMode() {
  const d = S.decoder;
  const el = $("decoder-mode");
  if (!el) return;
  el.textContent = d.mode === "page"
    ? `decoder: in-page (WebAssembly SIMD, ${d.threads} thread${d.threads === 1 ? "" : "s"})`
    : `decoder: server (${d.reason})`;
  el.title = el.textContent;
  el.dataset.mode = d.mode;
}

function useServer(reason) { S.decoder = { mode: "server", reason, threads: 0 }; showMode(); }

// The model query of every model-specific request (none: the server's default model).
export function modelQuery(sep = "?") { return S.model ? `${sep}model=${encodeURIComponent(S.model)}` : ""; }

// Decide which decoder runs for the picked model: called at start, when the setting or the model changes.
let generation = 0;  // a newer initDecoder (another model picked meanwhile) wins over an older one still starting
export async function initDecoder() {
  const mine = ++generation;
  session = null; decoderInfo = null;
  if (serverForced()) return useServer("set to server decoding");
  if (typeof WebAssembly !== "object") return useServer("this browser has no WebAssembly");
  let info;
  try { info = await api("GET", "/api/decoder" + modelQuery()); }
  catch (err) { if (mine === generation) useServer(`the server offers no page decoder: ${err.message}`); return; }
  if (mine !== generation) return;
  if (!info.available) return useServer(info.reason);
  decoderInfo = info;
  let started = sessions.get(info.key) || null;
  try {
    if (!started) {
      ort = ort || await import(VENDOR + "ort.wasm.min.mjs");
      // Threads need SharedArrayBuffer, which needs the page to be cross-origin isolated (the server sends COOP/COEP).
      // localStorage "segany.wasmThreads" overrides the count (benchmarks, a busy machine).
      const wanted = Number(localStorage.getItem("segany.wasmThreads")) || Math.min(4, navigator.hardwareConcurrency || 1);
      const threads = self.crossOriginIsolated ? Math.max(1, wanted) : 1;
      ort.env.wasm.wasmPaths = VENDOR;
      ort.env.wasm.numThreads = threads;
      const { bytes } = await cachedBytes(info.url, `decoder/${info.key}.onnx`);
      started = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
      started.threads = threads;
      if (info.image_graph) {  // SAM's decoders: the first block's image-side projections, made once per image
        const g = info.image_graph;
        const { bytes: perImage } = await cachedBytes(g.url, `decoder/${g.key}.onnx`);
        started.imageSession = await ort.InferenceSession.create(perImage, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
      }
      await warmUp(started, info);
      sessions.set(info.key, started);
    }
  } catch (err) {
    if (mine === generation) useServer(`ONNX Runtime Web did not start: ${err.message}`);
    return;
  }
  if (mine !== generation) return;
  session = started;
  S.decoder = { mode: "page", reason: "", threads: session.threads };
  showMode();
}

// One run on a blank prompt right after the session starts: ONNX Runtime allocates its buffers and
// threads on the first run, which would otherwise land on the annotator's first click.
async function warmUp(s, info) {
  const [, c, h, w] = info.embedding_shape || [1, 256, 64, 64], [lh, lw] = info.low_res_size;
  const t0 = performance.now();
  const image = new ort.Tensor("float32", new Float32Array(c * h * w), [1, c, h, w]);
  const projections = s.imageSession ? await s.imageSession.run({ image_embeddings: image }) : {};
  await s.run({
    image_embeddings: image,
    point_coords: new ort.Tensor("float32", Float32Array.from([10, 10, 0, 0]), [1, 2, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from([1, -1]), [1, 2]),
    mask_input: new ort.Tensor("float32", new Float32Array(lh * lw), [1, 1, lh, lw]),
    has_mask_input: new ort.Tensor("float32", Float32Array.from([0]), [1]),
    ...projections,
  });
  S.warmUpMs = performance.now() - t0;
}

// The image's projections for a decoder with a once-per-image graph (its outputs are the prompt graph's
// last inputs), made on the first need and kept with the embedding.
function projectionsOf(emb, s) {
  if (!s.imageSession) return Promise.resolve({});
  if (!emb.projections) {
    emb.projections = s.imageSession.run({ image_embeddings: emb.tensor });
    emb.projections.catch(() => { emb.projections = null; });  // retried on the next click
  }
  return emb.projections;
}

export async function setServerForced(on) {
  if (on) localStorage.setItem(FORCE_KEY, "1"); else localStorage.removeItem(FORCE_KEY);
  await initDecoder();
}

// Another model from the picker: its own decoder (in the page or the server's) and embeddings.
export async function setModel(name) {
  S.model = name;
  await initDecoder();
}

// ------------------------------------------------------------------ embeddings (safetensors, float16)

let halfTable = null;
function halfToFloat(u16) {
  if (!halfTable) {  // all 65536 half-precision values, once
    halfTable = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
      halfTable[h] = e === 0 ? s * f * 2 ** -24 : e === 31 ? (f ? NaN : s * Infinity) : s * (1 + f / 1024) * 2 ** (e - 15);
    }
  }
  const out = new Float32Array(u16.length);
  for (let i = 0; i < u16.length; i++) out[i] = halfTable[u16[i]];
  return out;
}

function parseSafetensors(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const entry = header.image_embeddings, meta = header.__metadata__ || {};
  if (!entry || !meta.original_size || !meta.input_size) throw new Error("the embedding file lacks image_embeddings or its sizes");
  const [begin, end] = entry.data_offsets;
  const raw = bytes.slice(8 + n + begin, 8 + n + end);  // a copy, aligned for the typed array
  let data;
  if (entry.dtype === "F16") data = halfToFloat(new Uint16Array(raw.buffer));
  else if (entry.dtype === "F32") data = new Float32Array(raw.buffer);
  else throw new Error(`unexpected embedding dtype ${entry.dtype}`);
  const sizes = (s) => s.split(",").map(Number);
  return { data, shape: entry.shape, originalSize: sizes(meta.original_size), inputSize: sizes(meta.input_size) };
}

// The image's embedding as an ONNX tensor; fetched once per image (then from the page's cache).
export function embeddingFor(image, dtype = "float16", info = decoderInfo) {
  const key = info.key, query = info.model ? `&model=${encodeURIComponent(info.model)}` : "";
  const id = `${key}/${image.id}/${dtype}`;
  if (!embeddings.has(id)) {
    const load = (async () => {
      const { bytes, fromCache } = await cachedBytes(`/api/images/${image.id}/embedding.safetensors?dtype=${dtype}${query}`,
        `embedding/${key}/${image.sha256}/${dtype}`);
      const e = parseSafetensors(bytes);
      return { tensor: new ort.Tensor("float32", e.data, e.shape), originalSize: e.originalSize, inputSize: e.inputSize, fromCache };
    })();
    load.catch(() => embeddings.delete(id));  // a failed load is retried on the next click
    embeddings.set(id, load);
    while (embeddings.size > KEEP_EMBEDDINGS) embeddings.delete(embeddings.keys().next().value);
  }
  return embeddings.get(id);
}

// Start fetching the open image's embedding before the first click.
export function prefetch(image) {
  if (S.decoder.mode !== "page" || !session) return;
  const s = session;
  embeddingFor(image).then((emb) => projectionsOf(emb, s)).catch(() => {});
}

// ------------------------------------------------------------------ decoding

// prompt: { points: [{x, y, label}], box: {x0, y0, x1, y1} | null, maskInput: Float32Array(256*256) | null }
// in image pixels. Returns the three multimask candidates as the server's decode does.
async function decodeInPage(image, prompt, picked) {
  const info = decoderInfo;
  const emb = await embeddingFor(image, S.embeddingDtype || "float16", info);
  const [h, w] = emb.originalSize, [ih, iw] = emb.inputSize;
  const sx = iw / w, sy = ih / h;  // the model's input frame (long side resized), as ResizeLongestSide.apply_coords
  const coords = [], labels = [];
  for (const p of prompt.points) { coords.push(p.x * sx, p.y * sy); labels.push(p.label); }
  if (prompt.box) { const b = prompt.box; coords.push(b.x0 * sx, b.y0 * sy, b.x1 * sx, b.y1 * sy); labels.push(2, 3); }
  else { coords.push(0, 0); labels.push(-1); }  // the padding point the model was trained with when there is no box
  const [lh, lw] = info.low_res_size;
  const feeds = {
    image_embeddings: emb.tensor,
    point_coords: new ort.Tensor("float32", Float32Array.from(coords), [1, labels.length, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from(labels), [1, labels.length]),
    mask_input: new ort.Tensor("float32", prompt.maskInput || new Float32Array(lh * lw), [1, 1, lh, lw]),
    has_mask_input: new ort.Tensor("float32", Float32Array.from([prompt.maskInput ? 1 : 0]), [1]),
    ...await projectionsOf(emb, picked),
  };
  const t0 = performance.now();
  const out = await picked.run(feeds);
  const ms = performance.now() - t0;
  const t1 = performance.now();
  const iou = out.iou_predictions.data, lowRes = out.low_res_masks.data;
  // The graph stops at the low-res logits: the page upscales a candidate's mask when it is shown
  // (the thumbnails sample the few pixels they draw), as the server's post-processing does.
  const up = upscaler([lh, lw], info.image_size, [ih, iw], [h, w]);
  const plane = h * w, lowPlane = lh * lw, threshold = info.mask_threshold;
  const candidates = [];
  for (let c = 1; c <= 3; c++) {  // channel 0 is the single-mask output; 1-3 the multimask candidates
    const low = lowRes.slice(c * lowPlane, (c + 1) * lowPlane);
    let mask = null;
    candidates.push({
      index: c - 1, score: iou[c], lowRes: low,
      maskAt: (y, x) => up.at(low, y, x) > threshold,
      get mask() {
        if (!mask) {
          const logits = up.full(low);
          mask = new Uint8Array(plane);
          for (let i = 0; i < plane; i++) mask[i] = logits[i] > threshold ? 1 : 0;
        }
        return mask;
      },
    });
  }
  let full = null;  // the four channels' logits at the image's size, computed only when asked (tests)
  S.lastDecode = {
    iou: Array.from(iou), lowRes, height: h, width: w, ms,
    get logits() {
      if (!full) {
        full = new Float32Array(4 * plane);
        for (let c = 0; c < 4; c++) full.set(up.full(lowRes.subarray(c * lowPlane, (c + 1) * lowPlane)), c * plane);
      }
      return full;
    },
  };
  let best = 0;
  candidates.forEach((c, i) => { if (c.score > candidates[best].score) best = i; });
  // decode_ms: session.run alone; masks_ms: the candidates (their masks are made when shown).
  return { candidates, best, token: null, mode: "page", decode_ms: ms, masks_ms: performance.now() - t1, model: info.model };
}

async function decodeOnServer(image, prompt) {
  const body = { points: prompt.points.map((p) => [p.x, p.y]), labels: prompt.points.map((p) => p.label), multimask: true };
  if (S.model) body.model = S.model;
  if (prompt.level) body.granularity = prompt.level;
  if (prompt.box) body.box = [prompt.box.x0, prompt.box.y0, prompt.box.x1, prompt.box.y1];
  if (prompt.token) body.mask_input = prompt.token;
  else if (prompt.maskInput) body.mask_input_b64 = floatsToBase64(prompt.maskInput);
  const out = await api("POST", `/api/images/${image.id}/decode`, body);
  const candidates = out.candidates.map((c) => ({ ...c, mask: decodeRle(c.segmentation) }));
  return { candidates, best: out.best, token: out.token, mode: "server", decode_ms: out.timing_ms.decode, server: out.timing_ms,
           model: out.model };
}

function floatsToBase64(values) {
  const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

// One decode in whichever mode runs; the page's decoder falls back to the server for this call if it fails.
export async function decodePrompt(image, prompt) {
  if (S.decoder.mode === "page" && session) {
    const picked = session;
    try { return await decodeInPage(image, prompt, picked); }
    catch (err) {
      console.warn("in-page decoding failed, asking the server", err);
      const out = await decodeOnServer(image, { ...prompt, token: null });
      out.fallback = err.message;
      return out;
    }
  }
  return decodeOnServer(image, prompt);
}
