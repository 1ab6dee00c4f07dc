"""The server against hostile requests (issue 20): Host / Origin / token, huge ids, streamed bodies,
huge prompt lists, hostile COCO files, cancellable jobs. A real server on 127.0.0.1 (tests/live_server.py)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, needs_shared
from tests.live_server import AUTH, TOKEN, live_server, png_bytes, wait_ready

pytestmark = needs_shared
pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

CAP = 2_000_000  # the test server's request limit


@pytest.fixture(scope="module")
def live(fixture_sam, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with live_server(fixture_sam, data, max_request_bytes=CAP, max_upload_bytes=300_000) as srv:
        c = srv["client"]
        project = c.post("/api/projects", json={"name": "p"}).json()
        up = c.post(f"/api/projects/{project['id']}/images", files=[("files", ("a.png", png_bytes(48, 64), "image/png"))])
        assert up.status_code == 201, up.text
        image = up.json()["images"][0]
        wait_ready(c, image["id"])
        ann = c.post(f"/api/images/{image['id']}/annotations",
                     json={"annotations": [{"segmentation": {"size": [48, 64], "counts": [100, 20, 48 * 64 - 120]}}]})
        assert ann.status_code == 201, ann.text
        yield {**srv, "project": project, "image": image, "annotation": ann.json()["annotations"][0]}


def counts(live):
    p = live["client"].get(f"/api/projects/{live['project']['id']}").json()
    return p["num_images"], p["num_annotations"]


def test_host_header_is_checked(live):
    c, aid = live["client"], live["annotation"]["id"]
    r = c.get("/api/projects", headers={"Host": "evil.example"})
    assert r.status_code == 421 and "evil.example" in r.json()["detail"]
    # DNS rebinding: the attacker's page talks to 127.0.0.1 under its own name: refused, nothing deleted.
    r = c.delete(f"/api/annotations/{aid}", headers={"Host": f"evil.example:{live['port']}"})
    assert r.status_code == 421
    assert c.get(f"/api/images/{live['image']['id']}/annotations").json()["annotations"][0]["id"] == aid
    for host in (f"localhost:{live['port']}", f"[::1]:{live['port']}", "127.0.0.1"):
        assert c.get("/api/projects", headers={"Host": host}).status_code == 200, host


def test_cross_origin_requests_are_refused(live):
    c, pid = live["client"], live["project"]["id"]
    before = counts(live)
    files = [("files", ("b.png", png_bytes(20, 20, 5), "image/png"))]
    r = c.post(f"/api/projects/{pid}/images", files=files, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "evil.example" in r.json()["detail"]
    r = c.delete(f"/api/annotations/{live['annotation']['id']}", headers={"Origin": "null"})
    assert r.status_code == 403
    assert counts(live) == before
    # The page's own origin is fine.
    r = c.post("/api/projects", json={"name": "same-origin"}, headers={"Origin": live["base"]})
    assert r.status_code == 201, r.text


def test_writes_need_the_token(live):
    base, pid = live["base"], live["project"]["id"]
    before = counts(live)
    r = httpx.post(f"{base}/api/projects", json={"name": "x"})
    assert r.status_code == 401 and "token" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{base}/api/projects", json={"name": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "wrong" in r.json()["detail"]
    r = httpx.delete(f"{base}/api/annotations/{live['annotation']['id']}")
    assert r.status_code == 401
    # The query parameter is for GET only (an <img src>), never for writes.
    r = httpx.post(f"{base}/api/projects?token={TOKEN}", json={"name": "x"})
    assert r.status_code == 401
    assert counts(live) == before
    # Reads from loopback need no token; the page and its assets never do.
    assert httpx.get(f"{base}/api/projects/{pid}").status_code == 200
    assert httpx.get(f"{base}/").status_code == 200
    assert httpx.get(f"{base}/static/js/main.js").status_code == 200


def test_non_loopback_clients_need_the_token_for_reads(fixture_sam, tmp_path):
    from fastapi.testclient import TestClient

    from segany.server import ServerConfig, create_app

    app = create_app(ServerConfig(data_dir=tmp_path, token=TOKEN), model=fixture_sam)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:  # its peer is "testclient", not loopback
        assert c.get("/api/projects").status_code == 401
        assert c.get("/api/projects", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/api/projects", headers=AUTH).status_code == 200
        assert c.get(f"/api/projects?token={TOKEN}").status_code == 200
        assert c.get("/").status_code == 200 and c.get("/static/app.css").status_code == 200


def test_serve_refuses_a_public_address_without_a_token():
    out = subprocess.run([sys.executable, "-m", "segany.cli.main", "serve", "-c", "none.pth", "--host", "0.0.0.0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "token" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/images/{big}"), ("GET", "/api/projects/{big}/images"), ("DELETE", "/api/annotations/{big}"),
    ("PATCH", "/api/annotations/{big}"), ("GET", "/api/projects/-{big}"), ("GET", "/api/images/{big}/export/sa1b"),
])
def test_ids_beyond_sqlite_are_404(live, method, path):
    for big in (2**63, 2**64 + 7, 10**30):
        r = live["client"].request(method, path.format(big=big), json={} if method == "PATCH" else None)
        assert r.status_code == 404, (path, big, r.text)


def test_label_id_beyond_sqlite_is_404(live):
    seg = {"size": [48, 64], "counts": [10, 5, 48 * 64 - 15]}
    r = live["client"].post(f"/api/images/{live['image']['id']}/annotations",
                            json={"annotations": [{"segmentation": seg, "label_id": 2**63}]})
    assert r.status_code == 404, r.text


def _chunked_upload(live, path, content_type, total, chunk=64 * 1024, prefix=b""):
    """Send `total` bytes chunked (no Content-Length); returns (status line, bytes sent before the answer)."""
    sock = socket.create_connection(("127.0.0.1", live["port"]), timeout=30)
    try:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{live['port']}\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        if prefix:
            sock.sendall(b"%x\r\n" % len(prefix) + prefix + b"\r\n")
        sent, block = 0, b"x" * chunk
        sock.setblocking(False)
        answer = b""
        while sent < total:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                sock.setblocking(True)
                sock.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
                sock.setblocking(False)
            except OSError:  # the server closed the connection after answering
                break
            sent += len(block)
        sock.setblocking(True)
        sock.settimeout(30)
        while b"\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
        return answer.split(b"\r\n", 1)[0].decode(), sent, answer
    finally:
        sock.close()


def test_chunked_upload_is_stopped_at_the_cap(live):
    boundary = "b0undary"
    prefix = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
              "Content-Type: image/png\r\n\r\n").encode()
    status, sent, _ = _chunked_upload(live, f"/api/projects/{live['project']['id']}/images",
                                      f"multipart/form-data; boundary={boundary}", total=100 * CAP, prefix=prefix)
    assert " 413 " in status + " ", status
    # What was sent before the answer includes what the kernel's socket buffers hold on both sides
    # (several MB on loopback); reading the whole body first would mean all 200 MB.
    assert sent < CAP + 16_000_000, f"{sent} bytes were sent before the 413 (cap {CAP})"


def test_huge_point_lists_are_refused_early_without_an_echo(live):
    c, iid = live["client"], live["image"]["id"]
    body = json.dumps({"points": [[1.5, 2.5]] * 2_000_000, "labels": [1] * 2_000_000})
    t0 = time.monotonic()
    r = c.post(f"/api/images/{iid}/decode", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and len(r.content) < 500, r.text[:200]
    status, sent, answer = _chunked_upload(live, f"/api/images/{iid}/decode", "application/json", total=30_000_000)
    assert " 413 " in status + " " and sent < CAP + 16_000_000 and len(answer) < 2000
    # Under the byte limit but over the count limit: a one-line 422 that does not repeat the points.
    r = c.post(f"/api/images/{iid}/decode", json={"points": [[1.5, 2.5]] * 5000, "labels": [1] * 5000})
    assert r.status_code == 422 and "256" in r.json()["detail"] and len(r.content) < 1000
    assert time.monotonic() - t0 < 60


HOSTILE_POLYGONS = [
    [[0, 0, 1e9, 0, 1e9, 1e9]],            # crashed the server (pycocotools) before
    [[0, 0, 1e7, 0, 1e7, 1e7]],            # allocated 1.4 GB before
    [[0, 0, -1e9, 5, 5, 5]],
    [[0, 0, 10, 0, float("nan"), 5]],
    [[1, 2] * 200_001],                    # too many coordinates
    [[0, 0, 60, 0, 60, 40, 0, 40] * 5000],  # near the image, but an outline of 2e6 px
]


@pytest.mark.parametrize("polygons", HOSTILE_POLYGONS, ids=range(len(HOSTILE_POLYGONS)))
def test_hostile_coco_import_is_422_and_the_server_lives(live, polygons):
    c, pid = live["client"], live["project"]["id"]
    before = counts(live)
    doc = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygons}]}
    r = c.post(f"/api/projects/{pid}/import/coco", files={"file": ("c.json", json.dumps(doc), "application/json")})
    assert r.status_code == 422, r.text[:300]
    assert c.get("/api/info").status_code == 200 and counts(live) == before
    # A sane polygon in the same file imports.
    doc["annotations"][0]["segmentation"] = [[2, 2, 30, 2, 30, 20, 2, 20]]
    r = c.post(f"/api/projects/{pid}/import/coco", files={"file": ("c.json", json.dumps(doc), "application/json")})
    assert r.status_code == 200 and r.json()["imported"] == 1, r.text


def test_hostile_polygon_in_a_subprocess_is_a_value_error():
    """The 1e9-coordinate polygon through the library, in a process of its own: a ValueError, no crash."""
    code = ("from segany.io.coco import polygons_rle\n"
            "try:\n    polygons_rle([[0, 0, 1e9, 0, 1e9, 1e9]], 48, 64)\nexcept ValueError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("refused:"), out.stderr[-500:]


def test_non_finite_numbers_are_refused_not_stored(live):
    c, iid = live["client"], live["image"]["id"]
    seg = {"size": [48, 64], "counts": [10, 5, 48 * 64 - 15]}
    before = counts(live)
    for item in ({"segmentation": seg, "score": "Infinity"}, {"segmentation": seg, "meta": {"x": "NaN"}}):
        raw = json.dumps({"annotations": [item]}).replace('"Infinity"', "Infinity").replace('"NaN"', "NaN")
        r = c.post(f"/api/images/{iid}/annotations", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
    assert counts(live) == before and c.get(f"/api/images/{iid}/annotations").status_code == 200
    doc = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [],
           "annotations": [{"id": 1, "image_id": 1, "segmentation": [[0, 0, 10**400, 0, 5, 5]]}]}
    r = c.post(f"/api/projects/{live['project']['id']}/import/coco",
               files={"file": ("c.json", json.dumps(doc), "application/json")})
    assert r.status_code == 422, r.text
    # An imported score of Infinity is dropped (the mask comes in); the image's list still reads.
    doc["annotations"][0].update(segmentation=[[2, 2, 20, 2, 20, 20]], score=float("inf"), id={"x": 1})
    r = c.post(f"/api/projects/{live['project']['id']}/import/coco",
               files={"file": ("c.json", json.dumps(doc), "application/json")})
    assert r.status_code == 200, r.text
    listed = c.get(f"/api/images/{iid}/annotations")
    assert listed.status_code == 200 and listed.json()["annotations"][-1]["score"] is None


def test_coco_import_with_odd_types_is_422(live):
    c, pid = live["client"], live["project"]["id"]
    for doc in ({"images": [{"id": [1], "file_name": "a.png"}], "annotations": [], "categories": []},
                {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": {}, "name": 1}],
                 "annotations": [{"image_id": [1], "segmentation": []}]},
                [1, 2, 3]):
        r = c.post(f"/api/projects/{pid}/import/coco", files={"file": ("c.json", json.dumps(doc), "application/json")})
        assert r.status_code == 422, r.text[:300]


def test_proposals_stop_when_the_client_goes_away(live):
    jobs = live["ctx"].jobs
    cancelled = jobs.cancelled
    body = json.dumps({"points_per_side": 64, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}).encode()
    sock = socket.create_connection(("127.0.0.1", live["port"]), timeout=30)
    sock.sendall((f"POST /api/images/{live['image']['id']}/proposals HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    deadline = time.monotonic() + 30
    while jobs.running == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert jobs.running == 1
    sock.close()  # the tab went away
    deadline = time.monotonic() + 30
    while jobs.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs.running == 0 and jobs.cancelled == cancelled + 1


def test_jobs_have_a_time_limit():
    from segany.server.jobs import Job

    job = Job(0.0)
    time.sleep(0.01)
    with pytest.raises(ValueError, match="limit"):  # a 422: the request asks for too much
        job.check()


def test_address_and_host_helpers():
    from segany.server.security import host_name, is_loopback_address, token_matches

    assert all(map(is_loopback_address, ["127.0.0.1", "127.8.0.3", "::1", "[::1]", "::ffff:127.0.0.1", "localhost"]))
    assert not any(map(is_loopback_address, ["10.0.0.1", "0.0.0.0", "testclient", "::ffff:10.1.1.1", "", None]))
    assert [host_name(h) for h in ["[::1]:8000", "LocalHost:80", "::1", "127.0.0.1.evil.example"]] == [
        "::1", "localhost", "::1", "127.0.0.1.evil.example"]
    assert token_matches(TOKEN, TOKEN) and not token_matches(TOKEN[:-1], TOKEN) and not token_matches("", TOKEN)
    assert not token_matches("t\udcff", TOKEN)  # undecodable header bytes: no match, no crash
