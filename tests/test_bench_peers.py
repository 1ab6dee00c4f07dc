"""The peer benchmark's harness (benchmarks/bench_peers.py): its arithmetic, and a tiny end-to-end run."""
from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter

import numpy as np
import pytest

from tests.conftest import REFERENCE, REFSHIM, ROOT, needs_shared

sys.path.insert(0, str(ROOT / "benchmarks"))
import peers_stats as stats  # noqa: E402


def test_schedule_runs_every_backend_once_per_round_and_rotates():
    backends = ["a", "b", "c"]
    order = stats.schedule(backends, 4)
    assert len(order) == 12
    for r in range(4):
        in_round = [b for rnd, b in order[3 * r : 3 * r + 3]]
        assert sorted(in_round) == backends  # rounds are interleaved, not backend after backend
        assert all(rnd == r for rnd, _ in order[3 * r : 3 * r + 3])
    firsts = [order[3 * r][1] for r in range(4)]
    assert firsts == ["a", "b", "c", "a"]
    assert Counter(b for _, b in order) == {"a": 4, "b": 4, "c": 4}


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError):
        stats.schedule(["a"], 0)
    with pytest.raises(ValueError):
        stats.schedule(["a", "a"], 1)


def test_medians_and_ranges():
    out = stats.medians({"x": {"encoder": [3.0, 1.0, 2.0, 10.0], "click": []}, "y": {"encoder": [5.0]}})
    assert out["x"]["encoder"] == (2.5, 1.0, 10.0)
    assert "click" not in out["x"]
    assert out["y"]["encoder"] == (5.0, 5.0, 5.0)


def test_rel_l2_and_mask_iou():
    a = np.array([3.0, 4.0])
    assert stats.rel_l2(a, a) == 0.0
    assert stats.rel_l2(a, np.array([3.0, 4.5])) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        stats.rel_l2(a, np.zeros(3))
    ref = np.array([1.0, 1.0, -1.0, -1.0, 0.01])
    assert stats.mask_iou(ref, ref) == 1.0
    # one of two positives lost, the unconfident last pixel ignored whatever its sign
    assert stats.mask_iou(ref, np.array([1.0, -1.0, -1.0, -1.0, -5.0])) == pytest.approx(0.5)
    assert stats.mask_iou(-np.ones(3), -np.ones(3)) == 1.0  # nothing positive: agree


def test_best_peer_ignores_segany_and_missing():
    times = {"released": 10.0, "ov-bf16": 1.4, "ort-fp32": None, "segany-fast": 1.0, "segany-exact": 2.8}
    assert stats.best_peer(times) == ("ov-bf16", 1.4)
    ratios = stats.ratios_to_best_peer(times)
    assert ratios["segany-fast"] == pytest.approx(1.4)
    assert ratios["segany-exact"] == pytest.approx(0.5)
    assert stats.best_peer({"segany-fast": 1.0}) is None
    assert stats.ratios_to_best_peer({"segany-fast": 1.0}) == {}


def test_table_rows_and_ratios():
    s = {
        "released": {"encoder": (10.0, 9.0, 11.0), "click": (0.04, 0.04, 0.04)},
        "ov-bf16": {"encoder": (1.5, 1.4, 1.6)},
        "segany-exact": {"encoder": (3.0, 3.0, 3.0), "click": (0.012, 0.012, 0.012)},
        "segany-fast": {"encoder": (1.2, 1.2, 1.2), "click": (0.005, 0.005, 0.005)},
    }
    text = stats.table("vit_b", s, ["released", "ov-bf16", "segany-exact", "segany-fast"], ["encoder", "click", "prompts64"])
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 3  # header, encoder, click (no backend has prompts64)
    encoder = lines[1].split(" | ")
    assert "10.00 s (9.00 s-11.00 s)" in encoder
    assert "ov-bf16 1.50 s" in encoder
    assert encoder[-2:] == ["0.50x", "1.25x |"]
    click = lines[2].split(" | ")
    assert "n/a" in click  # OpenVINO has no click figure here
    assert "released 40.0 ms" in click
    assert click[-1] == "8.00x |"


REQUIRES_ORT = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")


@pytest.mark.heavy  # seven fresh Python processes and an ONNX export: about half a minute of CPU
@needs_shared
@REQUIRES_ORT
def test_end_to_end_on_the_small_fixture_model(tmp_path):
    """One round on the fixtures' small SAM: released, ONNX Runtime fp32 on the released graphs, segany exact.
    The graphs and segany get the released weights and preprocessing: embeddings and clicks agree."""
    if not (REFERENCE / "sam_vit_small.pth").is_file() or not REFSHIM.is_dir():
        pytest.skip("../shared fixtures or refshim absent")
    import bench_peers

    out = tmp_path / "samples.json"
    bench_peers.main([
        "--models", "vit_small", "--backends", "released,ort-fp32,segany-exact", "--rounds", "1",
        "--rows", "encoder,click,everything", "--amg", "permissive", "--points-per-side", "4",
        "--workdir", str(tmp_path / "work"), "--json", str(out), "--out", str(tmp_path / "table.md"),
    ])
    res = json.loads(out.read_text())["vit_small"]
    assert res["errors"] == {}
    for backend in ("released", "ort-fp32", "segany-exact"):
        assert len(res["samples"][backend]["encoder"]) == 1
        assert res["samples"][backend]["click"][0] > 0
    for backend in ("ort-fp32", "segany-exact"):
        assert res["agreement"][backend]["embedding"] < 1e-4
        assert res["agreement"][backend]["click"] < 1e-3
        assert res["agreement"][backend]["iou"] > 0.99
    # the released generator over the ONNX decoder keeps what the released generator keeps
    assert res["masks"]["ort-fp32"] == res["masks"]["released"] == res["masks"]["segany-exact"]
    table = (tmp_path / "table.md").read_text()
    assert "| one click, masks at full size |" in table and "fast / best peer" in table
