"""Where an in-page click's time goes: ONNX Runtime Web's session.run alone, in headless Chromium.

    python benchmarks/bench_page_decoder.py                        # vit_b, 1 and 2 threads, 15 runs each, all graphs
    python benchmarks/bench_page_decoder.py --graphs lowres folded # the page's graph before and after the fold
    python benchmarks/bench_page_decoder.py --threads 1 --profile  # + time per operator type and per node (ORT's profiler)
    python benchmarks/bench_page_decoder.py --int8                 # + a dynamically quantised copy (comparison only)
    python benchmarks/bench_page_decoder.py --graphs folded --products --activations   # + the floor: products alone, GELUs alone
    python benchmarks/bench_page_decoder.py --graphs folded precomputed --rounds 4     # interleaved rounds, pooled (a busy machine)

Exports vit_b's prompt decoder (seeded random weights, the released configuration) as: the graph
`segany export-onnx` writes (masks upscaled to the image inside the graph: "full",
decoder_full.onnx), its low-res form from the plain modules (the page's graph until session 13:
"lowres", decoder_lowres.onnx) and the page's graph now (segany.engine.page_graph, the attentions
folded for a few tokens: "folded", decoder_lowres_folded.onnx) and that graph with the first block's image-side projections
made once per image by a second graph (PageImageGraph: "precomputed"; the row adds that graph's time,
once_per_image_ms). The low-res graphs stop at the 256x256
logits; the page then upscales the shown mask itself, timed too: "upscale_ms", one mask at 854x480
with segany/server/static/js/upscale.js. It serves them and the vendored ONNX Runtime Web from a throw-away HTTP server with the
page's COOP/COEP headers (so the page is cross-origin isolated and the WebAssembly may use threads),
and in headless Chromium (Debian's /usr/bin/chromium through Playwright) times session.run on a fixed
embedding and a one-click prompt for an 854x480 image (after two warm-up runs): wall time per run
(median, min) and the CPU time of all Chromium processes per run (what a loaded machine inflates
least). The annotator's own figures (click to mask on screen, the server's CPU) come from
bench_annotator.py; this isolates the decoder graph.

--products also times, for each graph, a graph of its matrix products alone (every MatMul, Gemm and
FusedMatMul of the graph as ONNX Runtime's extended optimisations leave it, with the same shapes,
attributes and constant weights; the other operands fed the values they take on the benchmark's click,
each product's output cut to one value by a Slice so nothing else is timed) and prints one summary row
per graph and thread count: the whole graph's time, the products' time, their multiply-adds and rate
(GMAC/s). That graph's wall time also copies its ~25 operands (several MB) into WebAssembly on every
run; with --profile the summary adds the products' kernel time from ORT's profiler (products_kernel_ms),
the figure to read as the products' own. The products' time is what no rewrite of the rest of the graph can go below with these
products in ONNX Runtime Web on this CPU. With --activations the summary adds the GELUs' time (the
page graph's 3M GELU values at the fastest exact form's measured rate; ORT Web has no cheaper exact
GELU, see --activations) and products + GELUs: the floor of this graph's arithmetic.

--activations times every exact GELU form ONNX Runtime Web offers over 2M values (the erf pattern torch
exports, which ORT fuses into com.microsoft Gelu; com.microsoft Gelu and BiasGelu; ONNX Gelu opset 20;
Erf alone) and, for scale only, cheaper activations that are not GELU (FastGelu's tanh approximation,
Sigmoid, Tanh, Relu).

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
GRAPHS = {"full": "decoder_full.onnx", "lowres": "decoder_lowres.onnx", "folded": "decoder_lowres_folded.onnx",
          "precomputed": "decoder_lowres_folded_precomputed.onnx"}
GRAPH_OPTIONS = {"full": {}, "lowres": {"low_res_only": True}, "folded": {"folded": True}, "precomputed": {"precomputed": True}}

RUN = """async ([model, threads, reps, profile, inputs]) => {
  const lowres = model.includes('lowres') && !inputs;
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
  let imageGraph = null;
  if (model.includes('precomputed') && !inputs) {  // the first block's projections, made once per image by a second graph
    const bytes2 = new Uint8Array(await (await fetch('/page_image_graph.onnx')).arrayBuffer());
    const s2 = await ort.InferenceSession.create(bytes2, {executionProviders: ['wasm'], graphOptimizationLevel: 'all'});
    await s2.run({ image_embeddings: feeds.image_embeddings });
    const t = [];
    for (let i = 0; i < 3; i++) { const t0 = performance.now(); Object.assign(feeds, await s2.run({ image_embeddings: feeds.image_embeddings })); t.push(performance.now() - t0); }
    imageGraph = t.sort((a, b) => a - b)[1];
  }
  if (inputs) {  // a products-only graph: its operands, fetched as raw float32
    for (const k of Object.keys(feeds)) delete feeds[k];
    for (const [name, shape, file] of inputs)
      feeds[name] = new ort.Tensor('float32', new Float32Array(await (await fetch('/' + file)).arrayBuffer()), shape);
  }
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
  return { isolated: self.crossOriginIsolated, cores: navigator.hardwareConcurrency, wall, cpu_ms_per_run: 1000 * cpu / reps, upscale, imageGraph };
}"""


PRODUCT_OPS = ("MatMul", "Gemm", "FusedMatMul")


def click_feeds(full: bool) -> dict:
    """The feeds RUN gives session.run (the same values), for onnxruntime in Python."""
    import numpy as np

    feeds = {
        "image_embeddings": (0.5 * np.sin(np.arange(256 * 64 * 64, dtype=np.float64))).astype(np.float32).reshape(1, 256, 64, 64),
        "point_coords": np.array([[[300, 200], [0, 0]]], np.float32),
        "point_labels": np.array([[1, -1]], np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
    }
    if full:
        feeds["orig_im_size"] = np.array([480, 854], np.float32)
    return feeds


def products_graph(graph: Path, out: Path, full: bool) -> dict:
    """Write a graph of `graph`'s matrix products alone to `out` (see the module docstring) and the values
    of their non-constant operands beside it as raw float32 files. Returns {"inputs": [[name, shape, file]],
    "macs": multiply-adds of one run, "products": [[node, op, operand shapes, MACs]]}."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    # The products as ONNX Runtime runs them: its extended optimisations fuse transposes and scales into
    # FusedMatMul and biases into Gemm (what the page's level "all" does on the WebAssembly CPU provider).
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    optimised = out.with_suffix(".optimised.onnx")
    options.optimized_model_filepath = str(optimised)
    onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(optimised))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    products = [n for n in model.graph.node if n.op_type in PRODUCT_OPS]
    if not products:
        raise SystemExit(f"{graph.name} has no matrix products")
    # every product's operands and output, as they are on the benchmark's click
    wanted = sorted({x for n in products for x in [*n.input, n.output[0]] if x and x not in consts})
    probe = onnx.load(str(optimised))
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in wanted)
    plain = onnxruntime.SessionOptions()
    plain.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(probe.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    feeds = click_feeds(full)
    image_graph = graph.parent / "page_image_graph.onnx"
    if image_graph.is_file():  # the precomputed graph's projections, from the once-per-image graph
        per_image = onnxruntime.InferenceSession(str(image_graph), providers=["CPUExecutionProvider"])
        feeds.update(zip([o.name for o in per_image.get_outputs()],
                         per_image.run(None, {"image_embeddings": feeds["image_embeddings"]})))
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    values = dict(zip(wanted, session.run(wanted, feeds)))
    values.update(consts)

    inputs, initialisers, nodes, outputs, rows, total = [], {}, [], [], [], 0
    for i, node in enumerate(products):
        operands = []
        for j, name in enumerate(node.input):
            if not name:
                operands.append("")
            elif name in consts:
                initialisers[name] = numpy_helper.from_array(np.asarray(consts[name]), name)
                operands.append(name)
            else:
                fed, value = f"p{i}_{j}", np.ascontiguousarray(values[name], dtype=np.float32)
                file = f"{out.stem}_{fed}.bin"
                (out.parent / file).write_bytes(value.tobytes())
                inputs.append([fed, list(value.shape), file])
                operands.append(fed)
        product = helper.make_node(node.op_type, operands, [f"p{i}"], name=node.name or f"p{i}", domain=node.domain)
        product.attribute.extend(node.attribute)
        result = values[node.output[0]]
        rank = result.ndim
        starts, ends = f"zeros{rank}", f"ones{rank}"
        initialisers[starts] = numpy_helper.from_array(np.zeros(rank, np.int64), starts)
        initialisers[ends] = numpy_helper.from_array(np.ones(rank, np.int64), ends)
        nodes += [product, helper.make_node("Slice", [f"p{i}", starts, ends], [f"s{i}"])]
        outputs.append(helper.make_tensor_value_info(f"s{i}", TensorProto.FLOAT, None))
        # multiply-adds: every output value is a dot product over the contracted size
        a = values[node.input[0]]
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        k = a.shape[-2] if attrs.get("transA") and a.ndim > 1 else a.shape[-1]
        macs = int(np.prod(result.shape)) * int(k)
        total += macs
        rows.append([node.name, node.op_type, [list(np.shape(values[x])) for x in node.input if x], macs])
    graph_proto = helper.make_graph(
        nodes, "products", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s, _ in inputs], outputs,
        list(initialisers.values()))
    onnx.save(helper.make_model(graph_proto, opset_imports=list(model.opset_import), ir_version=model.ir_version), str(out))
    optimised.unlink()
    # The products graph computes the whole graph's products: each one's first value as in the whole graph.
    check = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    fed = {name: np.fromfile(out.parent / file, np.float32).reshape(shape) for name, shape, file in inputs}
    for i, (node, first) in enumerate(zip(products, check.run([f"s{i}" for i in range(len(products))], fed))):
        expected = values[node.output[0]].reshape(-1)[0]
        if not np.isclose(first.reshape(-1)[0], expected, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"the products graph's {node.name} gives {first.reshape(-1)[0]}, the whole graph {expected}")
    return {"inputs": inputs, "macs": total, "products": rows}


# The page graph's GELUs run on 1M (after the first upscaling step's norm) and 2M (after the second) values.
GELU_SHAPE = (16384, 128)


def activation_graphs(folder: Path) -> list:
    """One graph per way ONNX Runtime Web can compute an exact GELU over GELU_SHAPE values (the erf pattern
    torch exports, which ORT fuses into com.microsoft Gelu; BiasGelu with the bias add fused in; ONNX's own
    Gelu, opset 20; Erf alone), and, for scale, cheaper activations that are NOT GELU (tanh-approximated
    FastGelu, Sigmoid, Tanh, Relu). Returns [(file, inputs)] for bench()."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = GELU_SHAPE
    x = np.random.default_rng(0).normal(0, 2, GELU_SHAPE).astype(np.float32)
    (folder / "gelu_x.bin").write_bytes(x.tobytes())
    bias = numpy_helper.from_array(np.random.default_rng(1).normal(0, 0.1, cols).astype(np.float32), "bias")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    root2 = numpy_helper.from_array(np.array(2 ** 0.5, np.float32), "root2")
    ms, onnx_domain = helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("", 17)
    variants = {
        "erf_pattern": ([helper.make_node("Div", ["x", "root2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                         helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
                         helper.make_node("Mul", ["m", "half"], ["y"])], [half, one, root2], [onnx_domain]),
        "ms_gelu": ([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], [], [onnx_domain, ms]),
        "ms_bias_gelu": ([helper.make_node("BiasGelu", ["x", "bias"], ["y"], domain="com.microsoft")], [bias], [onnx_domain, ms]),
        "onnx_gelu_opset20": ([helper.make_node("Gelu", ["x"], ["y"])], [], [helper.make_opsetid("", 20)]),
        "erf_alone": ([helper.make_node("Erf", ["x"], ["y"])], [], [onnx_domain]),
        "not_exact_fast_gelu": ([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")], [], [onnx_domain, ms]),
        "not_gelu_sigmoid": ([helper.make_node("Sigmoid", ["x"], ["y"])], [], [onnx_domain]),
        "not_gelu_tanh": ([helper.make_node("Tanh", ["x"], ["y"])], [], [onnx_domain]),
        "not_gelu_relu": ([helper.make_node("Relu", ["x"], ["y"])], [], [onnx_domain]),
    }
    out = []
    for name, (nodes, initialisers, opsets) in variants.items():
        # one value out: the output's copy back to JavaScript is not what is timed
        zeros, ones = numpy_helper.from_array(np.zeros(2, np.int64), "zeros"), numpy_helper.from_array(np.ones(2, np.int64), "ones")
        nodes = [*nodes, helper.make_node("Slice", ["y", "zeros", "ones"], ["first"])]
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(GELU_SHAPE))],
                                  [helper.make_tensor_value_info("first", TensorProto.FLOAT, None)], [*initialisers, zeros, ones])
        file = f"activation_{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(folder / file))
        out.append((file, [["x", list(GELU_SHAPE), "gelu_x.bin"]]))
    return out


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


def operator_times(console: list, by: str = "op_name", top: int = 12) -> list:
    """[operator type (or "type node" with by="node"), ms per run, % of the kernel time] from ORT's profile
    lines: each node's median over the profiled runs (a loaded machine's stalls land on random nodes)."""
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
        if e["name"].endswith("_kernel_time"):
            durations[(e["args"]["op_name"], e["name"][: -len("_kernel_time")])].append(e["dur"])
    times = collections.Counter()
    for (op, name), values in durations.items():
        times[op if by == "op_name" else f"{op} {name}"] += statistics.median(values)
    total = sum(times.values()) or 1
    return [[op, round(us / 1000, 2), round(100 * us / total, 1)] for op, us in times.most_common(top)]


async def bench(base: str, specs, reps: int, profile: bool) -> list:
    """specs: (graph file, threads, products-only inputs or None) -> one row each."""
    from playwright.async_api import async_playwright

    out = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        for model, threads, inputs in specs:
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
            r = await page.evaluate(RUN, [model, threads, reps, profile, inputs])
            await asyncio.sleep(0.5)
            row = {"graph": model, "threads": threads, "isolated": r["isolated"], "cores": r["cores"],
                   "wall_ms_median": round(statistics.median(r["wall"]), 1), "wall_ms_min": round(min(r["wall"]), 1),
                   "cpu_ms_per_run": round(r["cpu_ms_per_run"], 1)}
            if r["upscale"] is not None:
                row["upscale_ms"] = round(r["upscale"], 1)
            if r["imageGraph"] is not None:
                row["once_per_image_ms"] = round(r["imageGraph"], 1)
            if profile:
                row["operators_ms_%"] = operator_times(console)
                row["nodes_ms_%"] = operator_times(console, by="node", top=25)
                row["kernel_ms"] = round(sum(ms for _, ms, _ in operator_times(console, top=10_000)), 1)
                if os.environ.get("BENCH_PROFILE_ALL"):  # every node, for a closer look
                    row["all_nodes_ms_%"] = operator_times(console, by="node", top=10_000)
            print(json.dumps(row), flush=True)
            row["_wall"], row["_cpu"] = r["wall"], r["cpu_ms_per_run"]
            out.append(row)
            await page.close()
        await browser.close()
    return out


def pooled(rows: list) -> list:
    """One row per (graph, threads) over every round: the median and min of all rounds' runs, the mean of
    their CPU per run and kernel times (the rounds interleave the graphs, so a load that comes and goes
    falls on all of them alike)."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["graph"], r["threads"])].append(r)
    out = []
    for (graph, threads), group in groups.items():
        wall = [w for r in group for w in r["_wall"]]
        row = {**group[0], "rounds": len(group), "wall_ms_median": round(statistics.median(wall), 1),
               "wall_ms_min": round(min(wall), 1), "cpu_ms_per_run": round(statistics.mean(r["_cpu"] for r in group), 1),
               "round_medians": [r["wall_ms_median"] for r in group]}
        if "kernel_ms" in row:
            row["kernel_ms"] = round(statistics.mean(r["kernel_ms"] for r in group), 1)
        for key in ("_wall", "_cpu", "operators_ms_%", "nodes_ms_%", "all_nodes_ms_%"):
            row.pop(key, None)
        print(json.dumps({"pooled": True, **row}), flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="time per operator type (slows the runs)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every graph this many times, interleaved, and pool the runs (a loaded machine)")
    parser.add_argument("--int8", action="store_true", help="also time a dynamically quantised copy")
    parser.add_argument("--products", action="store_true",
                        help="also time each graph's matrix products alone (the floor) and print a summary")
    parser.add_argument("--activations", action="store_true",
                        help=f"also time the ways ORT Web computes GELU over {GELU_SHAPE[0] * GELU_SHAPE[1]:,} values")
    parser.add_argument("--graphs", nargs="*", choices=sorted(GRAPHS), default=sorted(GRAPHS),
                        help="which of the graphs to time (default: all three; none: only --activations)")
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
        if "precomputed" in args.graphs:
            from segany.io.onnx_export import export_page_image_graph

            export_page_image_graph(model, folder / "page_image_graph.onnx")
        if args.int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            if "decoder_lowres.onnx" not in graphs:
                export_decoder(model, folder / "decoder_lowres.onnx", low_res_only=True)
            quantize_dynamic(str(folder / "decoder_lowres.onnx"), str(folder / "decoder_lowres_int8.onnx"),
                             weight_type=QuantType.QUInt8)
            graphs.append("decoder_lowres_int8.onnx")
        specs = [(g, t, None) for g in graphs for t in args.threads]
        products = {}
        if args.products:
            for g in graphs:
                name = "products_" + g
                products[g] = products_graph(folder / g, folder / name, full=g == GRAPHS["full"])
                specs += [(name, t, products[g]["inputs"]) for t in args.threads]
                print(json.dumps({"graph": name, "products": len(products[g]["products"]),
                                  "gmac": round(products[g]["macs"] / 1e9, 3)}), flush=True)
        if args.activations:
            specs += [(file, t, inputs) for file, inputs in activation_graphs(folder) for t in args.threads]
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            rows = asyncio.run(bench(f"http://127.0.0.1:{server.server_address[1]}", specs * args.rounds, args.reps, args.profile))
        finally:
            server.shutdown()
        if args.rounds > 1:
            rows = pooled(rows)
        by = {(r["graph"], r["threads"]): r for r in rows}
        for g, info in products.items():
            for t in args.threads:
                whole, alone = by[(g, t)], by[("products_" + g, t)]
                summary = {
                    "summary": g, "threads": t, "whole_graph_ms": whole["wall_ms_median"],
                    "products_only_ms": alone["wall_ms_median"], "products_share": round(alone["wall_ms_median"] / whole["wall_ms_median"], 2),
                    "gmac_per_run": round(info["macs"] / 1e9, 3),
                    "products_gmac_per_s": round(info["macs"] / 1e6 / alone["wall_ms_median"], 2),
                    "whole_cpu_ms": whole["cpu_ms_per_run"], "products_cpu_ms": alone["cpu_ms_per_run"]}
                if args.profile:
                    # the products' own time: the products-only graph's wall time also copies its ~25 operands
                    # into WebAssembly on every run
                    summary.update(whole_kernel_ms=whole["kernel_ms"], products_kernel_ms=alone["kernel_ms"])
                if args.activations and g != GRAPHS["full"]:
                    # the low-res graphs' GELUs: 1M + 2M values (the upscaling's two steps), at the fastest exact form's rate
                    exact = [r["wall_ms_median"] for r in rows if r["threads"] == t and r["graph"].startswith("activation_")
                             and not r["graph"].startswith("activation_not_")]
                    gelu = min(exact) * 3 * 2**20 / (GELU_SHAPE[0] * GELU_SHAPE[1])
                    products_ms = alone["kernel_ms"] if args.profile else alone["wall_ms_median"]
                    summary.update(gelu_ms=round(gelu, 1), products_and_gelu_ms=round(products_ms + gelu, 1))
                print(json.dumps(summary), flush=True)
            if args.profile:
                for name, op, shapes, macs in sorted(info["products"], key=lambda r: -r[3])[:12]:
                    print(json.dumps({"product": name, "op": op, "shapes": shapes, "mmac": round(macs / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
