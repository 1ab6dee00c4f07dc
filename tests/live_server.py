"""A real server (uvicorn in a thread) on 127.0.0.1 for the security and schema tests: a loopback
peer, real sockets, chunked bodies, disconnects."""
from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(h: int, w: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def live_server(model, data_dir, **config_kw):
    import httpx
    import uvicorn

    from segany.server import ServerConfig, create_app

    config = ServerConfig(data_dir=data_dir, token=TOKEN, **config_kw)
    app = create_app(config, model=model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise AssertionError("server did not start in 30 s")
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=60, headers=AUTH)
    try:
        yield {"base": base, "port": port, "client": client, "app": app, "ctx": app.state.ctx}
    finally:
        client.close()
        server.should_exit = True
        thread.join(30)


def wait_ready(client, image_id, limit_s=120):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if client.get(f"/api/images/{image_id}/embedding").json()["status"] == "ready":
            return
        time.sleep(0.1)
    raise AssertionError("embedding not ready in time")
