"""Crash test: `segany serve` killed with SIGKILL in the middle of a burst of saves.

On restart every save the server acknowledged is there, unchanged, and the database passes
PRAGMA integrity_check.
"""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import REFERENCE, ROOT, needs_shared

pytestmark = needs_shared
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")
from pycocotools import mask as mask_utils  # noqa: E402


TOKEN = "crash-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data, port, log):
    cmd = [sys.executable, "-m", "segany.cli.main", "serve", "--checkpoint", str(REFERENCE / "sam_vit_small.pth"),
           "--data", str(data), "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, SEGANY_TOKEN=TOKEN)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/api/info", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start in 90 s")


def tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rect_rle(i: int) -> dict:
    mask = np.zeros((40, 50), np.uint8)
    y, x = i % 30, (i * 7) % 40
    mask[y : y + 1 + i % 10, x : x + 1 + i % 9] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [40, 50], "counts": rle["counts"].decode()}


def test_kill_during_burst_of_saves(tmp_path):
    data = tmp_path / "data"
    log = open(tmp_path / "server.log", "wb")
    port = free_port()
    proc, base = start_server(data, port, log)
    acked = {}  # annotation id -> counts the server acknowledged
    lock = threading.Lock()
    try:
        client = httpx.Client(base_url=base, timeout=10, headers=AUTH)
        pid = client.post("/api/projects", json={"name": "crash"}).json()["id"]
        iid = client.post(f"/api/projects/{pid}/images", files=[("files", ("t.png", tiny_png(), "image/png"))]).json()["images"][0]["id"]
        kill_after = 60
        killed = threading.Event()

        def save(i):
            if killed.is_set() and i % 50:  # after the kill, only a few more tries (to a dead server)
                return
            seg = rect_rle(i)
            try:
                r = client.post(f"/api/images/{iid}/annotations", json={"annotations": [{"segmentation": seg, "source": "api"}]})
            except httpx.HTTPError:
                return  # no answer: not acknowledged
            if r.status_code == 201:
                with lock:
                    acked[r.json()["annotations"][0]["id"]] = seg["counts"]
                    if len(acked) >= kill_after and not killed.is_set():
                        killed.set()
                        os.kill(proc.pid, signal.SIGKILL)  # saves are still in flight right now

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(save, range(400)))
        assert killed.is_set(), "the burst finished before the kill"
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        assert kill_after <= len(acked) < 400
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    # The database on disk is consistent, with every acknowledged save.
    db = sqlite3.connect(data / "segany.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = dict(db.execute("SELECT id, rle_counts FROM annotations").fetchall())
    finally:
        db.close()
    missing = [i for i in acked if i not in rows]
    assert not missing, f"{len(missing)} acknowledged saves are lost"
    assert all(rows[i] == counts for i, counts in acked.items())

    # The server restarts on it and serves them.
    proc, base = start_server(data, free_port(), log)
    try:
        listed = httpx.get(f"{base}/api/images/{iid}/annotations", timeout=10).json()["annotations"]
        assert set(acked) <= {a["id"] for a in listed}
        r = httpx.post(f"{base}/api/images/{iid}/annotations", json={"annotations": [{"segmentation": rect_rle(3)}]}, timeout=10,
                       headers=AUTH)
        assert r.status_code == 201
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
