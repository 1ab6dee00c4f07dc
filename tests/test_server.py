"""API tests of the annotation server (FastAPI TestClient, fixture checkpoint, small images)."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from tests.conftest import REFERENCE, needs_shared

pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
pytest.importorskip("httpx", reason="httpx (needed by FastAPI's TestClient) is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

pytestmark = needs_shared
CHECKPOINT = REFERENCE / "sam_vit_small.pth"


def png_bytes(h: int, w: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 40, np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(120, 255, 3)
    img += rng.integers(0, 10, img.shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def wait_ready(client, image_id, limit_s=120):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = client.get(f"/api/images/{image_id}/embedding").json()["status"]
        if status == "ready":
            return
        assert status in ("queued", "computing"), status
        time.sleep(0.1)
    raise AssertionError("embedding not ready in time")


@pytest.fixture(scope="module")
def server(fixture_sam, tmp_path_factory):
    from segany.server import ServerConfig, create_app

    data = tmp_path_factory.mktemp("data")
    imports = tmp_path_factory.mktemp("imports")
    config = ServerConfig(
        data_dir=data, checkpoint=CHECKPOINT, import_roots=[imports], max_upload_bytes=300_000, max_pixels=400 * 400
    )
    app = create_app(config, model=fixture_sam)
    # TestClient's peer is "testclient" (not loopback): every request needs the token, as a remote one would.
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        client.headers["X-User"] = "tester"
        client.headers["Authorization"] = f"Bearer {config.token}"
        project = client.post("/api/projects", json={"name": "demo"}).json()
        up = client.post(
            f"/api/projects/{project['id']}/images",
            files=[("files", ("a.png", png_bytes(48, 64, 0), "image/png"))],
        )
        assert up.status_code == 201, up.text
        image = up.json()["images"][0]
        wait_ready(client, image["id"])
        yield {"client": client, "project": project, "image": image, "data": data, "imports": imports, "app": app}


def db_counts(server):
    import sqlite3

    db = sqlite3.connect(server["data"] / "segany.db")
    try:
        return tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("projects", "images", "annotations"))
    finally:
        db.close()


def test_projects_and_labels(server):
    c = server["client"]
    names = [p["name"] for p in c.get("/api/projects").json()]
    assert "demo" in names
    assert c.post("/api/projects", json={"name": "demo"}).status_code == 409
    assert c.post("/api/projects", json={"name": ""}).status_code == 422
    assert c.get("/api/projects/99999").status_code == 404
    pid = server["project"]["id"]
    cat = c.post(f"/api/projects/{pid}/labels", json={"name": "cat"}).json()
    again = c.post(f"/api/projects/{pid}/labels", json={"name": "cat"}).json()
    assert cat["id"] == again["id"] and cat["color"].startswith("#")
    assert any(label["name"] == "cat" for label in c.get(f"/api/projects/{pid}/labels").json())
    assert "/api/images/{image_id}/decode" in c.get("/openapi.json").json()["paths"]


def test_upload_checks_write_nothing(server):
    c, pid = server["client"], server["project"]["id"]
    before = db_counts(server)
    stored_before = sorted(p.name for p in (server["data"] / "images").iterdir())
    r = c.post(f"/api/projects/{pid}/images", files=[("files", ("x.png", b"not an image at all", "image/png"))])
    assert r.status_code == 415 and "x.png" in r.json()["detail"]
    big = np.random.default_rng(1).integers(0, 255, 400_000, dtype=np.uint8).tobytes()
    r = c.post(f"/api/projects/{pid}/images", files=[("files", ("big.png", big, "image/png"))])
    assert r.status_code == 413
    r = c.post(f"/api/projects/{pid}/images", files=[("files", ("wide.png", png_bytes(20, 9000, 2), "image/png"))])
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    # One bad file in a batch: nothing of the batch is written.
    r = c.post(
        f"/api/projects/{pid}/images",
        files=[("files", ("ok.png", png_bytes(30, 30, 3), "image/png")), ("files", ("bad.jpg", b"\xff\xd8junk", "image/jpeg"))],
    )
    assert r.status_code == 415
    assert c.post("/api/projects/424242/images", files=[("files", ("a.png", png_bytes(8, 8, 1), "image/png"))]).status_code == 404
    assert db_counts(server) == before
    assert sorted(p.name for p in (server["data"] / "images").iterdir()) == stored_before


def test_upload_name_cannot_traverse(server, tmp_path):
    c, pid = server["client"], server["project"]["id"]
    data = png_bytes(24, 24, 7)
    r = c.post(f"/api/projects/{pid}/images", files=[("files", ("../../../evil.png", data, "image/png"))])
    assert r.status_code == 201
    image = r.json()["images"][0]
    assert image["file_name"] == "evil.png"
    assert (server["data"] / "images" / image["stored_name"]).read_bytes() == data
    assert not (server["data"].parent / "evil.png").exists()
    # The same content again is the same image.
    r2 = c.post(f"/api/projects/{pid}/images", files=[("files", ("copy.png", data, "image/png"))])
    assert r2.json()["images"][0]["id"] == image["id"] and r2.json()["images"][0]["created"] is False


def test_import_folder(server, tmp_path):
    c = server["client"]
    pid = c.post("/api/projects", json={"name": "folder"}).json()["id"]
    folder = server["imports"] / "set1"
    folder.mkdir()
    (folder / "one.png").write_bytes(png_bytes(32, 40, 11))
    (folder / "two.png").write_bytes(png_bytes(40, 32, 12))
    (folder / "notes.txt").write_text("hello")
    (folder / "fake.jpg").write_bytes(b"nope")
    r = c.post(f"/api/projects/{pid}/import-folder", json={"folder": str(folder)})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["added"]) == 2
    # Image files that fail the checks are named; other files are only counted (their names are nobody's business).
    assert {x["file"] for x in out["rejected"]} == {"fake.jpg"} and out["skipped"] == 1
    assert "notes.txt" not in r.text
    listing = c.get(f"/api/projects/{pid}/images").json()
    assert [i["file_name"] for i in listing["images"]] == ["one.png", "two.png"]
    assert listing["progress"]["total"] == 2
    assert all(i["embedding"] in ("queued", "computing", "ready") for i in listing["images"])
    # Recursive: sub-folders yes, hidden folders (.git) never entered nor mentioned.
    (folder / "sub").mkdir()
    (folder / "sub" / "three.png").write_bytes(png_bytes(36, 36, 13))
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (folder / ".git" / "secret.png").write_bytes(png_bytes(30, 30, 14))
    r = c.post(f"/api/projects/{pid}/import-folder", json={"folder": str(folder), "recursive": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["added"]) == 1 and len(out["existing"]) == 2 and out["skipped"] == 1
    assert ".git" not in r.text and "HEAD" not in r.text and "secret" not in r.text
    names = [i["file_name"] for i in c.get(f"/api/projects/{pid}/images").json()["images"]]
    assert names == ["one.png", "two.png", "sub/three.png"]
    # Outside the import roots, or via "..": refused.
    assert c.post(f"/api/projects/{pid}/import-folder", json={"folder": str(tmp_path)}).status_code == 403
    sneaky = str(folder / ".." / ".." / tmp_path.name)
    assert c.post(f"/api/projects/{pid}/import-folder", json={"folder": sneaky}).status_code in (403, 404)


def test_embedding_cached_on_disk(server):
    c, image = server["client"], server["image"]
    assert c.get(f"/api/images/{image['id']}/embedding").json()["status"] == "ready"
    service = server["app"].state.embeddings
    path = service.path_for(image["sha256"])
    assert path.is_file()
    # A fresh service over the same folder loads it instead of recomputing.
    from segany.server.embeddings import EmbeddingService

    fresh = EmbeddingService(service.segmenter, service.cache_dir)
    assert fresh.status(image["sha256"]) == "ready"
    emb = fresh.get(image["sha256"], server["data"] / "images" / image["stored_name"], timeout=1)
    assert emb.original_size == (48, 64)
    ref = service.segmenter.embed(server["data"] / "images" / image["stored_name"])
    np.testing.assert_allclose(emb.image_embeddings.numpy(), ref.image_embeddings.numpy(), atol=1e-5)


def test_decode_matches_segmenter(server, fixture_sam):
    from segany import Prompt, Segmenter

    c, image = server["client"], server["image"]
    r = c.post(f"/api/images/{image['id']}/decode", json={"points": [[20, 15]], "labels": [1]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["candidates"]) == 3 and out["token"]
    seg = Segmenter(fixture_sam)
    emb = seg.embed(server["data"] / "images" / image["stored_name"])
    pred = seg.segment(emb, Prompt(points=[[20, 15]], labels=[1]))
    np.testing.assert_allclose([cand["score"] for cand in out["candidates"]], pred.scores, atol=1e-4)
    for cand, mask in zip(out["candidates"], pred.masks):
        got = mask_utils.decode({"size": cand["segmentation"]["size"], "counts": cand["segmentation"]["counts"].encode()})
        assert got.shape == (48, 64)
        assert (got.astype(bool) != mask).mean() < 0.01  # random weights: logits near 0 may flip
    # Refine with the previous logits by reference, with one output.
    r2 = c.post(
        f"/api/images/{image['id']}/decode",
        json={"points": [[20, 15], [50, 40]], "labels": [1, 0], "mask_input": {"token": out["token"], "index": 0}, "multimask": False},
    )
    assert r2.status_code == 200, r2.text
    assert len(r2.json()["candidates"]) == 1
    ref = seg.segment(emb, Prompt(points=[[20, 15], [50, 40]], labels=[1, 0], mask=pred.low_res_logits[0]), multimask_output=False)
    assert abs(r2.json()["candidates"][0]["score"] - float(ref.scores[0])) < 1e-4
    # Box only.
    r3 = c.post(f"/api/images/{image['id']}/decode", json={"box": [5, 5, 40, 30]})
    assert r3.status_code == 200 and len(r3.json()["candidates"]) == 3


def test_decode_bad_input(server):
    c, image = server["client"], server["image"]
    iid = image["id"]
    r = c.post(f"/api/images/{iid}/decode", json={"points": [[500, 10]], "labels": [1]})
    assert r.status_code == 422 and "outside" in r.json()["detail"]
    assert c.post(f"/api/images/{iid}/decode", json={"points": [[5, 5]], "labels": [3]}).status_code == 422
    assert c.post(f"/api/images/{iid}/decode", json={"points": [[5, 5]], "labels": []}).status_code == 422
    assert c.post(f"/api/images/{iid}/decode", json={}).status_code == 422
    assert c.post(f"/api/images/{iid}/decode", json={"box": [0, 0, 10, 900]}).status_code == 422
    r = c.post(f"/api/images/{iid}/decode", json={"mask_input": {"token": "nope", "index": 0}})
    assert r.status_code == 422 and "token" in r.json()["detail"]
    assert c.post("/api/images/987654/decode", json={"points": [[5, 5]], "labels": [1]}).status_code == 404
    assert c.get("/api/images/987654/embedding").status_code == 404


def _rle_of(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def test_annotations_crud(server):
    c, image, pid = server["client"], server["image"], server["project"]["id"]
    iid = image["id"]
    label = c.post(f"/api/projects/{pid}/labels", json={"name": "box"}).json()
    rev0 = c.get(f"/api/projects/{pid}/revision").json()["revision"]
    mask = np.zeros((48, 64), bool)
    mask[10:20, 5:30] = True
    r = c.post(
        f"/api/images/{iid}/annotations",
        json={"annotations": [{"segmentation": _rle_of(mask), "label_id": label["id"], "score": 0.9, "source": "click",
                               "meta": {"point_coords": [[10, 12]]}}]},
    )
    assert r.status_code == 201, r.text
    ann = r.json()["annotations"][0]
    assert ann["area"] == 250 and ann["bbox"] == [5.0, 10.0, 25.0, 10.0] and ann["created_by"] == "tester"
    assert c.get(f"/api/projects/{pid}/revision").json()["revision"] > rev0
    # Uncompressed RLE (what the page sends after brushing) is accepted too.
    col_major = mask.T.flatten()
    runs, value, count = [], False, 0
    for px in col_major:
        if px != value:
            runs.append(count)
            value, count = px, 0
        count += 1
    runs.append(count)
    r = c.post(f"/api/images/{iid}/annotations", json={"annotations": [{"segmentation": {"size": [48, 64], "counts": runs}, "source": "brush"}]})
    assert r.status_code == 201 and r.json()["annotations"][0]["segmentation"]["counts"] == ann["segmentation"]["counts"]
    second = r.json()["annotations"][0]
    listed = c.get(f"/api/images/{iid}/annotations").json()["annotations"]
    assert {a["id"] for a in listed} >= {ann["id"], second["id"]}
    # Update: relabel and new mask; stale version -> 409.
    mask2 = np.zeros((48, 64), bool)
    mask2[30:40, 30:60] = True
    r = c.patch(f"/api/annotations/{ann['id']}", json={"segmentation": _rle_of(mask2), "version": ann["version"]})
    assert r.status_code == 200 and r.json()["area"] == 300 and r.json()["version"] == ann["version"] + 1
    r = c.patch(f"/api/annotations/{ann['id']}", json={"clear_label": True, "version": ann["version"]})
    assert r.status_code == 409
    r = c.patch(f"/api/annotations/{ann['id']}", json={"clear_label": True})
    assert r.status_code == 200 and r.json()["label_id"] is None
    # Bad input writes nothing.
    before = db_counts(server)
    bad = [
        {"segmentation": {"size": [48, 64], "counts": [5, 10]}},  # does not cover the image
        {"segmentation": {"size": [10, 10], "counts": _rle_of(np.ones((10, 10), bool))["counts"]}},  # wrong size
        {"segmentation": {"size": [48, 64], "counts": "!!!!"}},  # not RLE
        {"segmentation": {"size": [48, 64], "counts": [3072]}},  # empty mask
        {"segmentation": _rle_of(mask), "label_id": 999999},  # unknown label
    ]
    for item in bad:
        r = c.post(f"/api/images/{iid}/annotations", json={"annotations": [{"segmentation": _rle_of(mask)}, item]})
        assert r.status_code in (404, 422), (item, r.text)
    assert c.post("/api/images/31337/annotations", json={"annotations": [{"segmentation": _rle_of(mask)}]}).status_code == 404
    assert db_counts(server) == before
    # Delete.
    assert c.delete(f"/api/annotations/{second['id']}").status_code == 200
    assert c.delete(f"/api/annotations/{second['id']}").status_code == 404
    assert second["id"] not in {a["id"] for a in c.get(f"/api/images/{iid}/annotations").json()["annotations"]}


def test_export_coco_and_sa1b_and_import(server, tmp_path):
    from pycocotools.coco import COCO

    c, image, pid = server["client"], server["image"], server["project"]["id"]
    iid = image["id"]
    mask = np.zeros((48, 64), bool)
    mask[5:25, 40:60] = True
    label = c.post(f"/api/projects/{pid}/labels", json={"name": "square"}).json()
    ann = c.post(f"/api/images/{iid}/annotations",
                 json={"annotations": [{"segmentation": _rle_of(mask), "label_id": label["id"], "score": 0.75,
                                        "meta": {"point_coords": [[30, 12]], "stability_score": 0.5, "crop_box": "junk"}}]}).json()["annotations"][0]
    plain = c.post(f"/api/images/{iid}/annotations", json={"annotations": [{"segmentation": _rle_of(mask)}]}).json()["annotations"][0]
    r = c.get(f"/api/projects/{pid}/export/coco")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    path = tmp_path / "coco.json"
    path.write_bytes(r.content)
    coco = COCO(str(path))
    assert iid in coco.getImgIds()
    exported = coco.loadAnns([ann["id"]])[0]
    assert coco.loadCats([exported["category_id"]])[0]["name"] == "square"
    np.testing.assert_array_equal(coco.annToMask(exported).astype(bool), mask)
    for a in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs([a["image_id"]])[0]
        assert coco.annToMask(a).shape == (img["height"], img["width"])
    sa = c.get(f"/api/images/{iid}/export/sa1b").json()
    assert sa["image"]["width"] == 64 and sa["image"]["height"] == 48
    item = next(a for a in sa["annotations"] if a["id"] == ann["id"])
    assert item["predicted_iou"] == 0.75
    assert item["point_coords"] == [[30.0, 12.0]] and item["stability_score"] == 0.5 and "crop_box" not in item  # junk meta left out
    item = next(a for a in sa["annotations"] if a["id"] == plain["id"])
    assert set(item) == {"id", "segmentation", "bbox", "area"}  # a manual mask without score or SA-1B extras
    assert coco.loadCats([coco.loadAnns([plain["id"]])[0]["category_id"]])[0]["name"] == "unlabeled"
    assert "score" not in coco.loadAnns([plain["id"]])[0]
    np.testing.assert_array_equal(mask_utils.decode({"size": item["segmentation"]["size"], "counts": item["segmentation"]["counts"].encode()}).astype(bool), mask)

    # Import: a new project with the same image, a COCO file with a polygon and an RLE.
    pid2 = c.post("/api/projects", json={"name": "imported"}).json()["id"]
    data = (server["data"] / "images" / image["stored_name"]).read_bytes()
    new_image = c.post(f"/api/projects/{pid2}/images", files=[("files", ("a.png", data, "image/png"))]).json()["images"][0]
    coco_in = {
        "images": [{"id": 7, "file_name": "sub/a.png", "width": 64, "height": 48}, {"id": 8, "file_name": "gone.png", "width": 5, "height": 5}],
        "categories": [{"id": 3, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]], "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "segmentation": _rle_of(mask), "iscrowd": 0},
            {"id": 3, "image_id": 8, "category_id": 3, "segmentation": [[0, 0, 2, 0, 2, 2]], "iscrowd": 0},
        ],
    }
    r = c.post(f"/api/projects/{pid2}/import/coco", files={"file": ("in.json", json.dumps(coco_in), "application/json")})
    assert r.status_code == 200, r.text
    assert r.json()["imported"] == 2 and r.json()["missing_images"] == ["gone.png"]
    anns = c.get(f"/api/images/{new_image['id']}/annotations").json()["annotations"]
    labels = {label["id"]: label["name"] for label in c.get(f"/api/projects/{pid2}/labels").json()}
    assert [labels[a["label_id"]] for a in anns] == ["dog", "dog"]
    assert abs(anns[0]["area"] - 400) <= 45  # polygon rasterisation
    bad = c.post(f"/api/projects/{pid2}/import/coco", files={"file": ("x.json", b"{not json", "application/json")})
    assert bad.status_code == 422
    bad = c.post(f"/api/projects/{pid2}/import/coco", files={"file": ("x.json", json.dumps({"images": [], "annotations": 3}), "application/json")})
    assert bad.status_code == 422


def test_proposals(server):
    pytest.importorskip("segany.predict.amg", reason="everything mode (segany.predict.amg) is not available")
    c, image = server["client"], server["image"]
    r = c.post(
        f"/api/images/{image['id']}/proposals",
        json={"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0, "max_proposals": 5},
    )
    assert r.status_code == 200, r.text
    props = r.json()["proposals"]
    assert 1 <= len(props) <= 5
    scores = [p["predicted_iou"] for p in props]
    assert scores == sorted(scores, reverse=True)
    for p in props:
        m = mask_utils.decode({"size": p["segmentation"]["size"], "counts": p["segmentation"]["counts"].encode()})
        assert m.shape == (48, 64) and int(m.sum()) == p["area"]
    assert c.post("/api/images/55555/proposals", json={}).status_code == 404
    assert c.post(f"/api/images/{image['id']}/proposals", json={"points_per_side": 0}).status_code == 422


def test_page_is_served(server):
    c = server["client"]
    r = c.get("/")
    assert r.status_code == 200 and "<canvas" in r.text
    for module in ("main", "api", "rle", "state", "view", "tools", "objects", "proposals", "decode"):
        r = c.get(f"/static/js/{module}.js")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], module
    wasm = c.get("/static/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm")
    assert wasm.status_code == 200 and wasm.headers["content-type"] == "application/wasm"
