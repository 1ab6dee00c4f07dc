// The server's mask post-processing for the page: low-res logits (256x256) -> the image's size, as
// torch does it: bilinear (align_corners=False) to the model's input square (1024), crop the padding
// to the resized image (ih x iw), bilinear to the image (h x w). Both steps are separable linear maps,
// so each output row (column) is a weighted sum of at most 4 low-res rows (columns): computed once per
// image size, then one mask costs about 4*(256*w + h*w) multiply-adds, and one pixel 16.

// Torch's bilinear source index and weights for `out` outputs from `n` inputs, in float32 as torch
// computes them on the CPU: scale * (d + 0.5) - 0.5 fused (one rounding; the product of two float32
// values is exact in float64). A float64 source index moves the weights by up to ~1e-5, which a large
// downscale (a small image) turns into ~1e-4 on the logits.
const f32 = Math.fround;
function linearTaps(n, out) {
  const scale = f32(n / out), i0 = new Int32Array(out), i1 = new Int32Array(out), w1 = new Float64Array(out);
  for (let d = 0; d < out; d++) {
    const src = Math.max(0, f32(scale * (d + 0.5) - 0.5));
    const lo = Math.min(Math.floor(src), n - 1);
    i0[d] = lo; i1[d] = Math.min(lo + 1, n - 1); w1[d] = f32(src - lo);
  }
  return { i0, i1, w1 };
}

// One axis: `out` outputs from `low` low-res samples through the `square` frame cropped to `kept`.
function axis(low, square, kept, out) {
  const first = linearTaps(low, square), second = linearTaps(kept, out);
  const idx = new Int32Array(out * 4), wt = new Float64Array(out * 4);
  for (let d = 0; d < out; d++) {
    const taps = [[second.i0[d], 1 - second.w1[d]], [second.i1[d], second.w1[d]]];
    let k = 0;
    for (const [r, a] of taps) {
      idx[d * 4 + k] = first.i0[r]; wt[d * 4 + k] = a * (1 - first.w1[r]); k++;
      idx[d * 4 + k] = first.i1[r]; wt[d * 4 + k] = a * first.w1[r]; k++;
    }
  }
  return { idx, wt };
}

const cache = new Map();

// lowSize: [lh, lw]; square: the model's input size (1024); inputSize: [ih, iw]; size: [h, w].
export function upscaler(lowSize, square, inputSize, size) {
  const id = [lowSize, square, inputSize, size].join("/");
  if (cache.has(id)) return cache.get(id);
  const [lh, lw] = lowSize, [ih, iw] = inputSize, [h, w] = size;
  const ys = axis(lh, square, ih, h), xs = axis(lw, square, iw, w);
  const up = {
    // The logit at image pixel (y, x) of the plane `low` (Float32Array lh*lw).
    at(low, y, x) {
      let v = 0;
      for (let a = 0; a < 4; a++) {
        const row = ys.idx[y * 4 + a] * lw, wy = ys.wt[y * 4 + a];
        for (let b = 0; b < 4; b++) v += wy * xs.wt[x * 4 + b] * low[row + xs.idx[x * 4 + b]];
      }
      return v;
    },
    // The whole plane at the image's size (Float32Array h*w).
    full(low) {
      const cols = new Float64Array(lh * w);  // every low-res row at the output columns
      for (let r = 0; r < lh; r++) {
        const src = r * lw, dst = r * w;
        for (let x = 0; x < w; x++) {
          const k = x * 4;
          cols[dst + x] = xs.wt[k] * low[src + xs.idx[k]] + xs.wt[k + 1] * low[src + xs.idx[k + 1]]
            + xs.wt[k + 2] * low[src + xs.idx[k + 2]] + xs.wt[k + 3] * low[src + xs.idx[k + 3]];
        }
      }
      const out = new Float32Array(h * w);
      for (let y = 0; y < h; y++) {
        const k = y * 4, r0 = ys.idx[k] * w, r1 = ys.idx[k + 1] * w, r2 = ys.idx[k + 2] * w, r3 = ys.idx[k + 3] * w;
        const a0 = ys.wt[k], a1 = ys.wt[k + 1], a2 = ys.wt[k + 2], a3 = ys.wt[k + 3], dst = y * w;
        for (let x = 0; x < w; x++) out[dst + x] = a0 * cols[r0 + x] + a1 * cols[r1 + x] + a2 * cols[r2 + x] + a3 * cols[r3 + x];
      }
      return out;
    },
  };
  cache.set(id, up);
  return up;
}
