"""The page's mask upscaling (segany/server/static/js/upscale.js, run in Node.js) against the server's
post-processing in torch: bilinear 256 -> 1024, crop to the resized image, bilinear to the image."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

UPSCALE = Path(__file__).resolve().parents[1] / "segany" / "server" / "static" / "js" / "upscale.js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (runs the page's upscale.js)")

SCRIPT = """
import { upscaler } from %s;
import fs from "fs";
const cases = JSON.parse(fs.readFileSync(process.argv[2]));
const out = [];
for (const c of cases) {
  const low = Float32Array.from(c.low);
  const up = upscaler([256, 256], 1024, c.input, c.size);
  const full = up.full(low);
  const at = c.points.map(([y, x]) => up.at(low, y, x));
  out.push({ full: Array.from(full), at });
}
fs.writeFileSync(process.argv[3], JSON.stringify(out));
"""


def torch_upscale(low: torch.Tensor, size, input_size) -> np.ndarray:
    masks = F.interpolate(low[None, None], (1024, 1024), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, size, mode="bilinear", align_corners=False)[0, 0].numpy()


def test_upscale_js_equals_torch(tmp_path):
    rng = np.random.default_rng(7)
    cases, expected = [], []
    for h, w in [(61, 97), (300, 1100), (1100, 300), (5, 7), (1024, 1024), (333, 333)]:
        scale = 1024 / max(h, w)
        input_size = (int(h * scale + 0.5), int(w * scale + 0.5))
        low = torch.from_numpy(rng.normal(0, 8, (256, 256)).astype(np.float32))
        ref = torch_upscale(low, (h, w), input_size)
        points = [[int(rng.integers(0, h)), int(rng.integers(0, w))] for _ in range(50)]
        cases.append({"low": low.flatten().tolist(), "input": list(input_size), "size": [h, w], "points": points})
        expected.append((ref, points))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = tmp_path / "run.mjs"
    script.write_text(SCRIPT % json.dumps(UPSCALE.as_uri()))
    subprocess.run([NODE, str(script), str(tmp_path / "cases.json"), str(tmp_path / "out.json")], check=True, timeout=120)
    for (ref, points), got in zip(expected, json.loads((tmp_path / "out.json").read_text())):
        full = np.array(got["full"], dtype=np.float32).reshape(ref.shape)
        np.testing.assert_allclose(full, ref, atol=1e-5)  # logits of scale ~8: float32 rounding only
        np.testing.assert_allclose(got["at"], [ref[y, x] for y, x in points], atol=1e-5)
