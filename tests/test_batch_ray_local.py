"""A run that starts its own local Ray (no address, Ray not running) also stops it: Ray is disconnected
and every process it started has exited when the run returns (segany.batch.runner._stop_ray kills the
autoscaler monitor first instead of waiting a second for it); the image is done as on a running Ray."""
from __future__ import annotations

import os
import shutil

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'segany[ray]')")
pytest.importorskip("ray.data")

from segany.batch import RayOptions, run_everything  # noqa: E402

from .conftest import ROOT, needs_shared  # noqa: E402
from .test_batch import CKPT, SETTINGS, real_images  # noqa: E402

pytestmark = needs_shared


def live_children() -> set:
    """This process's child processes that are still running (not zombies)."""
    children = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as handle:
                text = handle.read()
        except OSError:
            continue
        state, ppid = text[text.rfind(")") + 2 :].split()[:2]
        if int(ppid) == os.getpid() and state != "Z":
            children.add(int(pid))
    return children


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_a_run_stops_the_local_ray_it_started(tmp_path, monkeypatch):
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Ray's workers import this checkout's segany
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(real_images(1)[0], folder)
    before = live_children()
    summary = run_everything([str(folder)], str(CKPT), str(tmp_path / "out"), settings=SETTINGS, progress=False,
                             ray=RayOptions(actors=1, cpus_per_actor=1), batch_size=1)
    assert (summary.done, summary.failed, summary.where) == (1, 0, "ray")
    assert {"ray_start", "shutdown"} <= set(summary.timings)
    assert not ray.is_initialized()
    assert live_children() <= before, "a process of the local Ray outlived the run"
