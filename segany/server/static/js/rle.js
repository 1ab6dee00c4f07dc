// COCO RLE (column-major runs), as pycocotools writes it.

// Compressed counts string -> run lengths (pycocotools' rleFrString).
export function rleRuns(counts) {
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

// {size: [h, w], counts} -> Uint8Array h*w, row-major.
export function decodeRle(seg) {
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

// Row-major mask -> uncompressed COCO RLE, which the server compresses.
export function encodeRle(mask, h, w) {
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
