"""The annotator's click latency and the server's CPU per click, in-page decoding against server decoding.

    python benchmarks/bench_annotator.py                      # vit_b (random weights), 30 clicks per annotator
    python benchmarks/bench_annotator.py --clicks 12 --annotators 4 --threads 1

Starts `segany serve` in a subprocess on a vit_b checkpoint with seeded random weights in the released
configuration and key names, uploads a DAVIS frame (854x480), waits for its embedding and the decoder's
ONNX export, then drives headless Chromium (Debian's /usr/bin/chromium through Playwright):
  1 annotator, in-page decoding, then server decoding: the decode time per click (ONNX Runtime Web's
    session.run in the page; the server's own decode timing), the time from the click to the frame
    with the mask (the page dispatches the click and waits until the mask has been drawn), and the CPU
    time per click of the browser (Chromium's processes and Playwright's driver, all threads) and of
    the server: CPU time is what a loaded machine inflates least;
  N annotators at once (separate browser contexts), each mode: the server process's CPU time
    (user + system, from /proc) over the run divided by the number of clicks (the pages' 1 s polling
    of the project is included).
Every click sequence is: clear, positive click, positive click (refines the chosen candidate with its
low-res logits), negative click. Each annotator clicks at seeded random places.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's segany
IMAGE = ROOT.parent / "shared" / "datasets" / "davis345" / "images" / "000.jpg"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "bench-annotator-token-0123"  # the server's access token (writes need it; the page reads it from the URL)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

CLICK_LOOP = """async ([n, seed]) => {
  const S = window.segany, canvas = document.getElementById("canvas");
  let state = seed;
  const rand = () => (state = (state * 1103515245 + 12345) % 2147483648) / 2147483648;
  const out = [];
  for (let i = 0; i < n; i++) {
    if (i % 3 === 0) window.dispatchEvent(new KeyboardEvent("keydown", { key: "Escape" }));
    const x = (0.1 + 0.8 * rand()) * S.image.width, y = (0.1 + 0.8 * rand()) * S.image.height;
    const r = canvas.getBoundingClientRect();
    const ev = { clientX: r.left + S.view.ox + x * S.view.scale, clientY: r.top + S.view.oy + y * S.view.scale,
                 button: i % 3 === 2 ? 2 : 0, bubbles: true };
    const before = S.timings.length, t0 = performance.now();
    canvas.dispatchEvent(new MouseEvent("mousedown", ev));
    window.dispatchEvent(new MouseEvent("mouseup", ev));
    while (S.timings.length === before) await new Promise((res) => setTimeout(res, 1));
    out.push({ ...S.timings[S.timings.length - 1], click_to_screen_ms: performance.now() - t0 });
  }
  return out;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def descendants(root: int):
    """Process ids below `root` (from /proc's parent links)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def browser_cpu_seconds(server_pid: int) -> float:
    """CPU time of this process's descendants except the server: Playwright's driver and Chromium."""
    skip = {server_pid, *descendants(server_pid)}
    total = 0.0
    for pid in descendants(os.getpid()):
        if pid not in skip:
            try:
                total += cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                pass
    return total


def summary(values):
    values = sorted(values)
    if not values:
        return "-"
    p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
    return f"{statistics.median(values):.1f} / {p90:.1f}"


async def run_annotators(browser, base, project, image, mode, annotators, clicks, threads=0):
    contexts, pages = [], []
    for _ in range(annotators):
        context = await browser.new_context(viewport={"width": 1400, "height": 820})
        await context.add_init_script(
            ("localStorage.setItem('segany.forceServerDecode', '1');" if mode == "server"
             else "localStorage.removeItem('segany.forceServerDecode');")
            + (f"localStorage.setItem('segany.wasmThreads', '{threads}');" if threads else ""))
        page = await context.new_page()
        await page.goto(f"{base}/?project={project}&image={image}#token={TOKEN}")
        await page.wait_for_function(f"window.segany && segany.shownImage === {image}", timeout=120000)
        await page.wait_for_function("segany.decoderReady !== undefined")
        await page.evaluate("segany.decoderReady")
        got = await page.evaluate("segany.decoder")
        if got["mode"] != mode:
            raise SystemExit(f"the page decodes in mode {got['mode']} ({got.get('reason')}), expected {mode}")
        # warm up: the embedding into the page (in-page mode) and the first run of the graph
        await page.evaluate(CLICK_LOOP, [2, 99])
        contexts.append(context)
        pages.append(page)
    return contexts, pages, got


async def main_async(args) -> dict:
    from playwright.async_api import async_playwright

    torch.manual_seed(0)
    from segany.io.models import sam_model_registry

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "random_vit_b.pth"
        torch.save(sam_model_registry["vit_b"]().state_dict(), checkpoint)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "segany.cli.main", "serve", "--checkpoint", str(checkpoint),
             "--data", str(Path(tmp) / "data"), "--port", str(port), "--token", TOKEN],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            client = httpx.Client(base_url=base, timeout=600, headers={"Authorization": f"Bearer {TOKEN}"})
            deadline = time.monotonic() + 300
            while True:
                try:
                    client.get("/api/info")
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
                    time.sleep(0.5)
            project = client.post("/api/projects", json={"name": "bench"}).json()["id"]
            up = client.post(f"/api/projects/{project}/images",
                             files=[("files", (IMAGE.name, IMAGE.read_bytes(), "image/jpeg"))]).json()
            image = up["images"][0]["id"]
            t0 = time.perf_counter()
            while client.get(f"/api/images/{image}/embedding").json()["status"] != "ready":
                time.sleep(0.2)
            results["embedding_s"] = round(time.perf_counter() - t0, 1)
            info = client.get("/api/decoder").json()
            t0 = time.perf_counter()
            onnx = client.get(info["url"])
            results["export_s"] = round(time.perf_counter() - t0, 1)
            results["decoder_bytes"] = len(onnx.content)
            results["embedding_bytes"] = len(client.get(f"/api/images/{image}/embedding.safetensors").content)

            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                for mode in ("page", "server"):
                    contexts, pages, decoder = await run_annotators(browser, base, project, image, mode, 1, args.clicks, args.threads)
                    client0, server0 = browser_cpu_seconds(server.pid), cpu_seconds(server.pid)
                    timings = await pages[0].evaluate(CLICK_LOOP, [args.clicks, 1])
                    client1, server1 = browser_cpu_seconds(server.pid), cpu_seconds(server.pid)
                    results[f"single_{mode}"] = {
                        "browser_cpu_ms_per_click": round(1000 * (client1 - client0) / len(timings), 1),
                        "server_cpu_ms_per_click": round(1000 * (server1 - server0) / len(timings), 1),
                        "decoder": decoder,
                        "decode_ms": summary([t["decode_ms"] for t in timings]),
                        "click_to_screen_ms": summary([t["click_to_screen_ms"] for t in timings]),
                        # in-page: making the candidates from the graph's outputs (their masks are made when shown)
                        "masks_ms": summary([t["masks_ms"] for t in timings if "masks_ms" in t]),
                        "clicks": len(timings),
                    }
                    for c in contexts:
                        await c.close()
                for mode in ("page", "server"):
                    contexts, pages, _ = await run_annotators(
                        browser, base, project, image, mode, args.annotators, args.clicks, args.threads)
                    cpu0, w0 = cpu_seconds(server.pid), time.perf_counter()
                    runs = await asyncio.gather(*[p.evaluate(CLICK_LOOP, [args.clicks, 7 + i]) for i, p in enumerate(pages)])
                    cpu1, w1 = cpu_seconds(server.pid), time.perf_counter()
                    timings = [t for run in runs for t in run]
                    results[f"multi_{mode}"] = {
                        "annotators": args.annotators,
                        "clicks": len(timings),
                        "wall_s": round(w1 - w0, 1),
                        "server_cpu_s": round(cpu1 - cpu0, 2),
                        "server_cpu_ms_per_click": round(1000 * (cpu1 - cpu0) / len(timings), 1),
                        "decode_ms": summary([t["decode_ms"] for t in timings]),
                        "click_to_screen_ms": summary([t["click_to_screen_ms"] for t in timings]),
                    }
                    for c in contexts:
                        await c.close()
                await browser.close()
        finally:
            server.terminate()
            server.wait(30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=30, help="clicks per annotator and mode")
    parser.add_argument("--annotators", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="WebAssembly threads per page (0: the page's default)")
    args = parser.parse_args()
    if not IMAGE.is_file():
        raise SystemExit(f"{IMAGE} is absent (the benchmark reads ../shared)")
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is absent (apt-get install chromium)")
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=1))
    print("\n| 1 annotator | decode per click (median / p90, ms) | click to mask on screen (median / p90, ms) "
          "| browser CPU per click (ms) | server CPU per click (ms) |")
    print("|---|---|---|---|---|")
    for mode, where in (("page", "in-page (ONNX Runtime Web)"), ("server", "server")):
        r = results[f"single_{mode}"]
        print(f"| {where} | {r['decode_ms']} | {r['click_to_screen_ms']} | {r['browser_cpu_ms_per_click']} "
              f"| {r['server_cpu_ms_per_click']} |")
    print(f"\n| {args.annotators} annotators | server CPU per click (ms) | clicks | wall (s) | click to screen (median / p90, ms) |")
    print("|---|---|---|---|---|")
    for mode in ("page", "server"):
        r = results[f"multi_{mode}"]
        print(f"| {mode} decoding | {r['server_cpu_ms_per_click']} | {r['clicks']} | {r['wall_s']} | {r['click_to_screen_ms']} |")


if __name__ == "__main__":
    main()
