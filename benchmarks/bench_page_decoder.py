"""Where an in-page click's time goes: ONNX Runtime Web's session.run alone, in headless Chromium.

    python benchmarks/bench_page_decoder.py                        # vit_b, 1 and 2 threads, 15 runs each, all graphs
    python benchmarks/bench_page_decoder.py --graphs lowres folded # the page's graph before and after the fold
    python benchmarks/bench_page_decoder.py --threads 1 --profile  # + time per operator type and per node (ORT's profiler)
    python benchmarks/bench_page_decoder.py --int8                 # + a dynamically quantised copy (comparison only)

Exports vit_b's prompt decoder (seeded random weights, the released configuration) as: the graph
`segany export-onnx` writes (masks upscaled to the image inside the graph: "full",
decoder_full.onnx), its low-res form from the plain modules (the page's graph until session 13:
"lowres", decoder_lowres.onnx) and the page's graph now (segany.engine.page_graph, the attentions
folded for a few tokens: "folded", decoder_lowres_folded.onnx). The low-res graphs stop at the 256x256
logits; the page then upscales the shown mask itself, timed too: "upscale_ms", one mask at 854x480
with segany/server/static/js/upscale.js. It serves them and the vendored ONNX Runtime Web from a throw-away HTTP server with the
page's COOP/COEP headers (so the page is cross-origin isolated and the WebAssembly may use threads),
and in headless Chromium (Debian's /usr/bin/chromium through Playwright) times session.run on a fixed
embedding and a one-click prompt for an 854x480 image (after two warm-up runs): wall time per run
(median, min) and the CPU time of all Chromium processes per run (what a loaded machine inflates
least). The annotator's own figures (click to mask on screen, the server's CPU) come from
bench_annotator.py; this isolates the decoder graph.

--int8 also times onnxruntime.quantization.quantize_dynamic's copy of the graph: it is not what the page
runs (its logits are not the server's within 1e-4), only how much int8 would buy.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's segany
VENDOR = ROOT / "segany" / "server" / "static" / "vendor" / "onnxruntime-web"
CHROMIUM = "/usr/bin/chromium"
# The graphs compared: `segany export-onnx`'s ("full"), its low-res form from the plain modules (the page's
# graph before the fold: "lowres") and the page's graph now (segany.engine.page_graph: "folded").
GRAPHS = {"full": "decoder_full.onnx", "lowres": "decoder_lowres.onnx", "folded": "decoder_lowres_folded.onnx"}
GRAPH_OPTIONS = {"full": {}, "lowres": {"low_res_only": True}, "folded": {"folded": True}}

RUN = """async ([model, threads, reps, profile]) => {
  const lowres = model.includes('lowres');
  const ort = await import('/vendor/ort.wasm.min.mjs');
  ort.env.wasm.wasmPaths = '/vendor/'; ort.env.wasm.numThreads = threads;
  const bytes = new Uint8Array(await (await fetch('/' + model)).arrayBuffer());
  const s = await ort.InferenceSession.create(bytes, {executionProviders: ['wasm'], graphOptimizationLevel: 'all',
                                                      enableProfiling: profile});
  const e = new Float32Array(256 * 64 * 64); for (let i = 0; i < e.length; i++) e[i] = 0.5 * Math.sin(i);
  const feeds = { image_embeddings: new ort.Tensor('float32', e, [1, 256, 64, 64]),
    point_coords: new ort.Tensor('float32', Float32Array.from([300, 200, 0, 0]), [1, 2, 2]),
    point_labels: new ort.Tensor('float32', Float32Array.from([1, -1]), [1, 2]),
    mask_input: new ort.Tensor('float32', new Float32Array(256 * 256), [1, 1, 256, 256]),
    has_mask_input: new ort.Tensor('float32', Float32Array.from([0]), [1]),
    orig_im_size: new ort.Tensor('float32', Float32Array.from([480, 854]), [2]) };
  if (lowres) delete feeds.orig_im_size;
  await s.run(feeds); await s.run(feeds);
  const wall = [];
  await window.benchCpu();
  for (let i = 0; i < reps; i++) { const t0 = performance.now(); await s.run(feeds); wall.push(performance.now() - t0); }
  const cpu = await window.benchCpu();
  if (profile) await s.endProfiling();  // ONNX Runtime Web prints the profile to the console
  let upscale = null;
  if (lowres) {  // the page's own upscaling of the one mask it shows
    const { upscaler } = await import('/js/upscale.js');
    const out = await s.run(feeds), low = out.low_res_masks.data.subarray(65536, 2 * 65536);
    const up = upscaler([256, 256], 1024, [576, 1024], [480, 854]);
    up.full(low);
    const t = [];
    for (let i = 0; i < reps; i++) { const t0 = performance.now(); up.full(low); t.push(performance.now() - t0); }
    upscale = t.sort((a, b) => a - b)[t.length >> 1];
  }
  return { isolated: self.crossOriginIsolated, cores: navigator.hardwareConcurrency, wall, cpu_ms_per_run: 1000 * cpu / reps, upscale };
}"""


class Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm", ".mjs": "text/javascript"}

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, *args):
        pass


def chromium_cpu_seconds() -> float:
    total = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if "chrom" in stat.split(")")[0]:
                fields = stat.rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def operator_shares(console: list, by: str = "op_name", top: int = 10) -> list:
    """(operator type, or node name with by="node", % of the kernel time) from ORT's profile lines: each
    node's median over the profiled runs (a loaded machine's stalls land on random nodes)."""
    events = []
    for line in console:
        line = line.strip().rstrip(",")
        if line.startswith('{"cat" : "Node"'):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    durations = collections.defaultdict(list)
    for e in events:  # each node appears once per run
        durations[(e["args"]["op_name"], e["name"])].append(e["dur"])
    shares = collections.Counter()
    for (op, name), values in durations.items():
        shares[op if by == "op_name" else f"{op} {name}"] += statistics.median(values)
    total = sum(shares.values()) or 1
    return [(op, round(100 * us / total, 1)) for op, us in shares.most_common(top)]


async def bench(base: str, specs, reps: int, profile: bool) -> list:
    from playwright.async_api import async_playwright

    out = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        for model, threads in specs:
            page = await browser.new_page()
            last = {"cpu": None}

            def mark() -> float:
                now, before = chromium_cpu_seconds(), last["cpu"]
                last["cpu"] = now
                return 0.0 if before is None else now - before

            console = []
            page.on("console", lambda m: console.append(m.text))
            await page.expose_function("benchCpu", mark)
            await page.goto(base + "/index.html")
            r = await page.evaluate(RUN, [model, threads, reps, profile])
            await asyncio.sleep(0.5)
            row = {"graph": model, "threads": threads, "isolated": r["isolated"], "cores": r["cores"],
                   "wall_ms_median": round(statistics.median(r["wall"]), 1), "wall_ms_min": round(min(r["wall"]), 1),
                   "cpu_ms_per_run": round(r["cpu_ms_per_run"], 1)}
            if r["upscale"] is not None:
                row["upscale_ms"] = round(r["upscale"], 1)
            if profile:
                row["operators_%"] = operator_shares(console)
                row["nodes_%"] = operator_shares(console, by="node", top=25)
            out.append(row)
            print(json.dumps(row), flush=True)
            await page.close()
        await browser.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="time per operator type (slows the runs)")
    parser.add_argument("--int8", action="store_true", help="also time a dynamically quantised copy")
    parser.add_argument("--graphs", nargs="+", choices=sorted(GRAPHS), default=sorted(GRAPHS),
                        help="which of the graphs to time (default: all three)")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is absent (apt-get install chromium)")
    import torch

    from segany.io.models import sam_model_registry
    from segany.io.onnx_export import export_decoder

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "index.html").write_text("<!doctype html><title>bench</title>")
        os.symlink(VENDOR, folder / "vendor")
        os.symlink(VENDOR.parent.parent / "js", folder / "js")
        torch.manual_seed(0)
        model = sam_model_registry["vit_b"]().eval()
        graphs = []
        for name in args.graphs:
            export_decoder(model, folder / GRAPHS[name], **GRAPH_OPTIONS[name])
            graphs.append(GRAPHS[name])
        if args.int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            if "decoder_lowres.onnx" not in graphs:
                export_decoder(model, folder / "decoder_lowres.onnx", low_res_only=True)
            quantize_dynamic(str(folder / "decoder_lowres.onnx"), str(folder / "decoder_lowres_int8.onnx"),
                             weight_type=QuantType.QUInt8)
            graphs.append("decoder_lowres_int8.onnx")
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            specs = [(g, t) for g in graphs for t in args.threads]
            asyncio.run(bench(f"http://127.0.0.1:{server.server_address[1]}", specs, args.reps, args.profile))
        finally:
            server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
