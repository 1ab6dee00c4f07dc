"""segany.batch on a local Ray (2 CPUs, loopback only), started once for the module: the Ray run's
outputs equal the in-process run's; a killed actor's images are redone exactly once; a corrupt image is
an error row; an interrupted run resumes without duplicates; embeddings equal the server's own."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'segany[ray]')")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")

from segany.batch import RayOptions, run_embed, run_everything  # noqa: E402
from segany.batch import sinks  # noqa: E402

from .conftest import DATASETS, ROOT, needs_shared  # noqa: E402
from .test_batch import CKPT, SETTINGS, check_same_embeddings, real_images  # noqa: E402

pytestmark = needs_shared
N_FAST = 3  # images in the default suite; the heavy variant uses 20


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The workers import this checkout's segany (and this module, for the fault-injection hooks).
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


def make_inputs(folder, n):
    """n real images (GrabCut, then DAVIS) and one corrupt JPEG."""
    folder.mkdir()
    images = real_images(min(n, 50)) + sorted((DATASETS / "davis345" / "images").glob("*"))[: max(0, n - 50)]
    for path in images[:n]:
        shutil.copy(path, folder / path.name)
    (folder / "corrupt.jpg").write_bytes((folder / images[0].name).read_bytes()[:300])
    return folder


def outputs(out):
    rows = sorted(sinks.read_shards(str(out)), key=lambda r: r["image_id"])
    files = {p.name: p.read_bytes() for p in sorted(out.glob("*.json"))}
    return rows, files


def check_complete(out, folder):
    """Every readable image exactly once in the shards and as a JSON; no temporary or partial file."""
    expected = sorted(p.stem for p in folder.iterdir() if p.stem != "corrupt")
    rows, files = outputs(out)
    assert [r["image_id"] for r in rows] == expected
    assert sorted(files) == [f"{e}.json" for e in expected]
    assert not list(out.rglob(".*.tmp"))
    return rows, files


def crash_once(marker, image_id, target):
    """Kill the actor process (as a lost node would) the first time it reaches `target`; every image
    must be segmented on the actor's own model thread (segany.batch.workers.OnOneThread), else it fails."""
    import threading

    if not threading.current_thread().name.startswith("segany-model"):
        raise RuntimeError(f"{image_id} segmented on thread {threading.current_thread().name}")
    if image_id == target and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def fail_on(target, image_id):
    if image_id == target:
        raise RuntimeError(f"interrupted at {image_id}")


def equality_with_in_process(local_ray, tmp_path, n):
    folder = make_inputs(tmp_path / "in", n)
    # one torch thread here as in each actor: oneDNN's sums depend on the thread count (last float bits)
    here = run_everything([str(folder)], str(CKPT), str(tmp_path / "here"), fmt="sa1b+parquet", settings=SETTINGS,
                          progress=False, threads=1)
    # the model as the driver loaded it, shared through the object store (the default, each actor loading
    # the checkpoint, is what the other tests run)
    there = run_everything([str(folder)], str(CKPT), str(tmp_path / "ray"), fmt="sa1b+parquet", settings=SETTINGS,
                           ray=RayOptions(actors=2, cpus_per_actor=1, share_model=True), batch_size=2,
                           progress=False)
    assert (there.done, there.failed, there.where) == (n, 1, "ray") and here.done == n
    assert there.errors == here.errors and there.errors[0]["id"] == "corrupt"
    assert check_complete(tmp_path / "ray", folder) == check_complete(tmp_path / "here", folder)
    summary = json.loads((tmp_path / "ray" / "_segany" / "summary.json").read_text())
    assert summary["done"] == n and summary["failed"] == 1 and summary["images_per_second"] > 0
    timings = summary["timings"]  # where the wall time went: every part measured, none longer than the whole
    assert {"setup", "model_put", "workers_ready", "model_load", "first_result", "images", "total"} <= set(timings)
    assert all(0 <= v <= timings["total"] for v in timings.values())


def test_ray_equals_in_process_with_a_corrupt_image(local_ray, tmp_path):
    equality_with_in_process(local_ray, tmp_path, N_FAST)


@pytest.mark.heavy
def test_ray_equals_in_process_20_images(local_ray, tmp_path):
    equality_with_in_process(local_ray, tmp_path, 20)


def test_killed_actor_is_replaced_and_its_images_redone_once(local_ray, tmp_path):
    import functools

    folder = make_inputs(tmp_path / "in", 3)
    marker = tmp_path / "crashed"
    target = sorted(p.stem for p in folder.iterdir())[1]
    out = tmp_path / "out"
    summary = run_everything([str(folder)], str(CKPT), str(out), fmt="sa1b+parquet", settings=SETTINGS,
                             ray=RayOptions(actors=2, cpus_per_actor=1), batch_size=2, progress=False,
                             before_image=functools.partial(crash_once, str(marker), target=target))
    assert marker.exists(), "the actor never reached the marked image"
    assert (summary.done, summary.failed, summary.skipped) == (3, 1, 0)
    check_complete(out, folder)


@pytest.mark.heavy
def test_interrupted_ray_run_resumes(local_ray, tmp_path):
    import functools

    folder = make_inputs(tmp_path / "in", 6)
    out = tmp_path / "out"
    names = sorted(p.stem for p in folder.iterdir())
    options = dict(fmt="sa1b+parquet", settings=SETTINGS, batch_size=1, progress=False)
    with pytest.raises(Exception, match="interrupted at"):
        run_everything([str(folder)], str(CKPT), str(out), ray=RayOptions(actors=1, cpus_per_actor=1),
                       before_image=functools.partial(fail_on, names[4]), **options)
    finished = {r["image_id"] for r in sinks.read_shards(str(out))}
    assert names[4] not in finished and not list(out.rglob(".*.tmp"))
    summary = run_everything([str(folder)], str(CKPT), str(out), ray=RayOptions(actors=2, cpus_per_actor=1),
                             **options)
    assert summary.skipped == len(finished) and summary.done + summary.failed + summary.skipped == 7
    check_complete(out, folder)


@pytest.mark.heavy
def test_embed_on_ray_equals_the_server(local_ray, tmp_path):
    pytest.importorskip("fastapi")
    images = real_images(3)
    data = tmp_path / "data"
    summary = run_embed([str(p) for p in images], str(CKPT), str(data), ray=RayOptions(actors=2, cpus_per_actor=1),
                        batch_size=1, progress=False)
    assert summary.done == 3
    check_same_embeddings(images, data, tmp_path / "server", threads=1)
