"""segany.batch without Ray: sources, the in-process run (same files as `segany everything`), error rows,
resume after an interruption, and `segany embed` writing exactly the server's embedding cache."""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import tarfile

import pytest
from click.testing import CliRunner

from segany.batch import list_items, run_embed, run_everything
from segany.batch import sinks
from segany.batch.sources import read_bytes

from .conftest import DATASETS, REFERENCE, needs_shared

CKPT = REFERENCE / "sam_vit_small.pth"
SETTINGS = {"points_per_side": 2, "pred_iou_thresh": 0.05, "stability_score_thresh": 0.5,
            "stability_score_offset": 0.02}
CLI_SETTINGS = ["--points-per-side", "2", "--pred-iou-thresh", "0.05", "--stability-score-thresh", "0.5",
                "--stability-score-offset", "0.02"]


def real_images(n):
    return sorted((DATASETS / "grabcut" / "images").glob("*"))[:n]


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for path in real_images(2):
        shutil.copy(path, images / path.name)
    return images


# ----------------------------------------------------------------------------- sources (no model)

@needs_shared
def test_sources_manifests_lists_and_tar(tmp_path):
    a, b = real_images(2)
    (tmp_path / "sub").mkdir()
    shutil.copy(a, tmp_path / "sub" / "x.jpg")
    (tmp_path / "m.csv").write_text(f"id,path\nfirst,{a}\n,sub/x.jpg\n")
    items = list_items([str(tmp_path / "m.csv")])
    assert [i.id for i in items] == ["first", "x"] and items[1].uri == str(tmp_path / "sub" / "x.jpg")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": 7, "url": f"file://{b}"}) + "\n\n")
    [item] = list_items([str(tmp_path / "m.jsonl")])
    assert item.id == "7" and read_bytes(item) == b.read_bytes()
    (tmp_path / "l.txt").write_text(f"# comment\n{a}\nsub/x.jpg\n")
    assert [i.id for i in list_items([str(tmp_path / "l.txt")])] == [a.stem, "x"]
    # SA-1B shard: images (and their json) inside a tar, read by byte range
    shard = tmp_path / "sa_000000.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(a, arcname=f"sa_1{a.suffix}")
        info = tarfile.TarInfo("sa_1.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        tar.add(b, arcname=f"sa_2{b.suffix}")
    items = list_items([str(shard)])
    assert [i.id for i in items] == ["sa_1", "sa_2"]
    assert read_bytes(items[0]) == a.read_bytes() and read_bytes(items[1]) == b.read_bytes()
    # the same stem in two folders gets a hash; explicit ids must be unique and safe
    (tmp_path / "other").mkdir()
    shutil.copy(a, tmp_path / "other" / "x.jpg")
    ids = [i.id for i in list_items([str(tmp_path / "sub"), str(tmp_path / "other")])]
    assert len(set(ids)) == 2 and all(i.startswith("x_") for i in ids)
    for bad in ("../evil", ".hidden"):
        (tmp_path / "bad.csv").write_text(f"id,path\n{bad},{a}\n")
        with pytest.raises(ValueError, match="not usable as a file name"):
            list_items([str(tmp_path / "bad.csv")])
    (tmp_path / "dup.csv").write_text(f"id,path\nq,{a}\nq,{b}\n")
    with pytest.raises(ValueError, match="share the id"):
        list_items([str(tmp_path / "dup.csv")])
    (tmp_path / "nopath.csv").write_text("id,file\nq,x\n")
    with pytest.raises(ValueError, match="needs a 'path'"):
        list_items([str(tmp_path / "nopath.csv")])


def test_a_worker_is_built_and_called_on_one_thread_of_its_own():
    """Ray Data builds an actor's callable on one thread and calls it on others; torch's OpenMP runtime
    then sleeps at every barrier (segany.batch.workers.OnOneThread): loading and every call stay on one
    thread, whichever thread calls, and the worker's errors reach the caller unchanged."""
    import threading

    from segany.batch.workers import OnOneThread

    class Probe:
        def __init__(self, job):
            self.job, self.threads = job, [threading.get_ident()]

        def __call__(self, batch):
            self.threads.append(threading.get_ident())
            if batch["id"][0] == "bad":
                raise RuntimeError("bad batch")
            return {"id": list(batch["id"]), "job": [self.job] * len(batch["id"])}

    wrapped = OnOneThread(Probe, "job-1")
    outputs = [wrapped({"id": ["a"]})]
    caller = threading.Thread(target=lambda: outputs.append(wrapped({"id": ["b", "c"]})))
    caller.start()
    caller.join()
    assert outputs == [{"id": ["a"], "job": ["job-1"]}, {"id": ["b", "c"], "job": ["job-1", "job-1"]}]
    with pytest.raises(RuntimeError, match="bad batch"):
        wrapped({"id": ["bad"]})
    threads = set(wrapped._worker.threads)
    assert len(wrapped._worker.threads) == 4 and len(threads) == 1
    assert threads.isdisjoint({threading.get_ident(), caller.ident})


def test_ray_missing_is_one_line(tmp_path, monkeypatch, capsys):
    from segany.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    with pytest.raises(SystemExit) as exc:
        main(["everything", str(image), "-c", str(CKPT), "--out", str(tmp_path / "o"), "--ray"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --ray needs Ray: pip install 'segany[ray]'"
    with pytest.raises(SystemExit) as exc:
        main(["everything", "--ray", str(tmp_path), str(image), "-c", str(CKPT), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "not a Ray address" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in-process runs

@needs_shared
def test_in_process_equals_everything_cli_and_resumes(folder, tmp_path, monkeypatch):
    from segany.cli.everything import everything

    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    cli_out = tmp_path / "cli"
    result = CliRunner().invoke(everything, [str(folder), "-c", str(CKPT), "--out", str(cli_out), *CLI_SETTINGS])
    assert result.exit_code == 1  # the broken image
    out = tmp_path / "batch"
    stop = {"after": 1, "seen": 0}

    def interrupt(image_id):  # an interruption (Ctrl-C, a lost node) after one image
        stop["seen"] += 1
        if stop["seen"] > stop["after"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_everything([str(folder)], str(CKPT), str(out), fmt="sa1b+parquet", settings=SETTINGS, batch_size=1,
                       progress=False, before_image=interrupt)
    assert len(sinks.read_shards(str(out))) == 1
    summary = run_everything([str(folder)], str(CKPT), str(out), fmt="sa1b+parquet", settings=SETTINGS,
                             batch_size=1, progress=False)
    assert (summary.skipped, summary.done, summary.failed) == (1, 1, 1)
    assert summary.errors[0]["id"] == "broken" and "not an image" in summary.errors[0]["reason"]
    saved = json.loads((out / "_segany" / "summary.json").read_text())
    assert saved["done"] == 1 and saved["skipped"] == 1 and saved["errors"] == summary.errors
    timings = saved["timings"]  # in-process: set-up, model loading, images; no Ray parts
    assert {"setup", "workers_ready", "model_load", "images", "total"} <= set(timings) and "ray_start" not in timings
    assert all(0 <= v <= timings["total"] for v in timings.values())
    # the same bytes as the in-process `segany everything`, every image once, no partial file
    for path in real_images(2):
        assert (out / f"{path.stem}.json").read_bytes() == (cli_out / f"{path.stem}.json").read_bytes()
    rows = sinks.read_shards(str(out))
    assert sorted(r["image_id"] for r in rows) == sorted(p.stem for p in real_images(2))
    for row in rows:
        doc = json.loads((out / f"{row['image_id']}.json").read_text())
        assert row["width"] == doc["image"]["width"] and row["file_name"] == doc["image"]["file_name"]
        assert [a["segmentation"] for a in row["annotations"]] == [a["segmentation"] for a in doc["annotations"]]
        assert json.loads(row["settings"])["points_per_side"] == 2 and row["model"].endswith("-exact")
    assert not list(out.rglob(".*.tmp"))
    # a third run has nothing to do; other settings into the same folder are refused
    again = run_everything([str(folder)], str(CKPT), str(out), fmt="sa1b+parquet", settings=SETTINGS,
                           progress=False)
    assert (again.skipped, again.done) == (2, 0) and again.failed == 1
    with pytest.raises(ValueError, match="another run"):
        run_everything([str(folder)], str(CKPT), str(out), fmt="sa1b+parquet",
                       settings={**SETTINGS, "points_per_side": 3}, progress=False)
    if importlib.util.find_spec("ray") and importlib.util.find_spec("ray.data"):  # refused before a local Ray is started for nothing
        from segany.batch import RayOptions, runner

        def no_ray(*args):
            raise AssertionError("Ray started")

        monkeypatch.setattr(runner, "_start_ray", no_ray)
        with pytest.raises(ValueError, match="another run"):
            run_everything([str(folder)], str(CKPT), str(out), fmt="sa1b+parquet",
                           settings={**SETTINGS, "points_per_side": 3}, progress=False, ray=RayOptions())


def server_embedding(image_path, data_dir):
    """What the annotation server itself writes for an image: its EmbeddingService under its own key."""
    import hashlib

    import segany
    from segany.io.embedding_cache import cache_dir, model_key
    from segany.server.embeddings import EmbeddingService

    service = EmbeddingService(segany.Segmenter(segany.load_model(CKPT)),
                               cache_dir(data_dir, model_key(CKPT, "exact")))
    sha = hashlib.sha256(image_path.read_bytes()).hexdigest()
    service._compute(sha, image_path)
    return service.path_for(sha)


def check_same_embeddings(images, data_dir, server_dir, threads=0):
    import torch
    from safetensors import safe_open

    before = torch.get_num_threads()
    try:
        if threads:  # as many torch threads as the workers had: the sums' order depends on it
            torch.set_num_threads(threads)
        theirs_all = [server_embedding(image, server_dir) for image in images]
    finally:
        torch.set_num_threads(before)
    for image, theirs in zip(images, theirs_all):
        ours = data_dir / theirs.relative_to(server_dir)
        assert ours.is_file(), f"no cache file at the server's key {ours}"
        with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                assert a.get_tensor(key).equal(b.get_tensor(key))


@needs_shared
def test_embed_writes_the_servers_cache(tmp_path):
    pytest.importorskip("fastapi")
    from segany.cli.main import main

    images = real_images(2)
    data = tmp_path / "data"
    main(["embed", *map(str, images), "-c", str(CKPT), "--data", str(data)])
    check_same_embeddings(images, data, tmp_path / "server")
    summary = run_embed([str(p) for p in images], str(CKPT), str(data), progress=False)
    assert (summary.skipped, summary.done) == (2, 0)


@needs_shared
def test_object_store_urls_through_fsspec():
    """Sources and outputs as fsspec URLs (the in-memory file system stands in for s3:// or gs://)."""
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("pyarrow")
    fs = fsspec.filesystem("memory")
    a, b = real_images(2)
    fs.pipe("/bucket/images/a.jpg", a.read_bytes())
    fs.pipe("/bucket/images/b.jpg", b.read_bytes())
    fs.pipe("/bucket/images/notes.txt", b"not an image")
    items = list_items(["memory://bucket/images/"])
    assert [i.id for i in items] == ["a", "b"] and read_bytes(items[1]) == b.read_bytes()
    fs.pipe("/bucket/list.txt", b"images/a.jpg\n")
    [item] = list_items(["memory://bucket/list.txt"])
    assert item.uri == "memory://bucket/images/a.jpg"
    out = "memory://bucket/out"
    sinks.make_dirs(out)
    doc = {"image": {"width": 2, "height": 1, "file_name": "a.jpg"},
           "annotations": [{"id": 1, "segmentation": {"size": [1, 2], "counts": "01"}, "bbox": [0.0, 0.0, 1.0, 1.0],
                            "area": 1, "predicted_iou": 0.5, "stability_score": 0.9,
                            "crop_box": [0.0, 0.0, 2.0, 1.0], "point_coords": [[0.5, 0.5]]}]}
    sinks.write_shard(out, [sinks.parquet_row("a", doc, "{}", "m")])
    assert sinks.done_ids(out, {"sa1b", "parquet"}) == {"a"}
    [row] = sinks.read_shards(out)
    assert row["annotations"] == doc["annotations"] and row["image_id"] == "a"
    sinks.check_run(out, {"model": "m"})
    with pytest.raises(ValueError, match="another run"):
        sinks.check_run(out, {"model": "other"})
