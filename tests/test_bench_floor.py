"""The floor benchmark (benchmarks/bench_floor.py): what it counts, against the encoders' arithmetic by hand."""
from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_floor  # noqa: E402


def _flop(recorder):
    linear = sum(2.0 * r * k * n * c for (r, k, n), c in recorder.linear.items())
    attention = sum(2.0 * b * m * k * n * c for (b, m, k, n), c in recorder.bmm.items())
    conv = sum(bench_floor.conv_flop(spec) * c for spec, c in recorder.conv.items())
    return linear, attention, conv


def test_vit_b_counts_match_the_arithmetic_by_hand():
    recorder = bench_floor.record("vit_b")
    linear, attention, conv = _flop(recorder)
    tokens, width, blocks = 64 * 64, 768, 12
    # qkv, output projection and MLP over the image's 4096 positions in every block (not the windows' padding)
    assert linear == 2.0 * blocks * tokens * (width * 3 * width + width * width + 2 * width * 4 * width)
    # 4 global blocks (4096 x 4096 per head), 8 windowed (25 windows of 14 x 14 with the padding's keys),
    # q k^T and probabilities x v; plus the rel-pos terms (q against the gathered tables)
    products = 4 * 2 * 2.0 * tokens * tokens * width + 8 * 2 * 2.0 * 25 * 196 * 196 * width
    rel_pos = 4 * 2 * 2.0 * tokens * 64 * width + 8 * 2 * 2.0 * 25 * 196 * 14 * width
    assert attention == pytest.approx(products + rel_pos, rel=1e-12)
    # patch embedding (16 x 16 stride 16), the neck's 1x1 and 3x3 convolutions
    assert conv == 2.0 * tokens * (width * 3 * 256 + width * 256 + 256 * 9 * 256)


def test_vit_t_token_wise_layers_run_over_the_positions_only():
    recorder = bench_floor.record("vit_t")
    rows_by_width = {}
    for (rows, k, n), _ in recorder.linear.items():
        rows_by_width.setdefault(k, set()).add(rows)
    # stage 1 at 128 x 128 positions (width 128, MLP 512), stages 2 and 3 at 64 x 64 (widths 160, 320)
    assert rows_by_width == {128: {16384}, 512: {16384}, 160: {4096}, 640: {4096}, 320: {4096}, 1280: {4096}}
    assert sum(recorder.linear.values()) == 4 * (2 + 6 + 2)  # qkv, proj, fc1, fc2 per attention block
    assert sum(recorder.conv.values()) > 20  # stem, MBConvs, patch mergings, local convolutions, neck


def test_targets_read_bench_peers_medians():
    peers = {"vit_t": {"samples": {"ov-bf16": {"encoder": [0.30, 0.40, 0.35]}, "ov-f32": {"encoder": [0.6]},
                                   "segany-fast": {"encoder": [0.3, 0.31, 0.29]}}}}
    found = bench_floor.targets(peers, "vit_t")
    assert found["bfloat16"] == pytest.approx((0.35 / 1.25, "ov-bf16", 0.35, 0.30))
    assert found["float32"] == pytest.approx((0.6 / 1.2, "ov-f32", 0.6))
    assert bench_floor.targets({}, "vit_b") == {}


def test_the_floor_times_every_recorded_shape():
    """A small recorder through the timing: seconds and FLOP per kind, positive and consistent."""
    recorder = bench_floor.RecordProducts()
    recorder.linear[(64, 32, 48)] = 2
    recorder.bmm[(2, 16, 8, 16)] = 1
    recorder.conv[((1, 4, 10, 10), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1)] = 1
    parts = bench_floor.floor(recorder, torch.float32, reps=1)
    assert parts["linear"][1] == 2 * 2.0 * 64 * 32 * 48
    assert parts["attention"][1] == 2.0 * 2 * 16 * 8 * 16
    assert parts["conv"][1] == 2.0 * 10 * 10 * 6 * 4 * 9
    assert all(seconds > 0 for seconds, _ in parts.values())


def test_element_wise_work_is_counted_from_the_definition():
    """GELU, softmax and layer-norm values of vit_t's released math: the MLPs' and convolutions' GELUs,
    every window's softmax rows (padded keys included), every layer norm."""
    recorder = bench_floor.record("vit_t")
    values = {}
    for (kind, _), count in recorder.elementwise.items():
        values[kind] = values.get(kind, 0) + count
    # softmax: stage 1 (2 blocks, 19 x 19 windows of 49, 4 heads), stage 2 (6 blocks, 5 x 5 windows of 196,
    # 5 heads), stage 3 (2 blocks, 10 x 10 windows of 49, 10 heads): n x n values per window and head
    assert values["softmax"] == 2 * 361 * 4 * 49 * 49 + 6 * 25 * 5 * 196 * 196 + 2 * 100 * 10 * 49 * 49
    assert values["gelu"] > 100_000_000 and values["layer norm"] > 0


def test_element_wise_floor_scales_a_block_rate_to_the_values():
    recorder = bench_floor.RecordProducts()
    recorder.elementwise[("gelu", 64)] = 1 << 20
    recorder.elementwise[("softmax", 49)] = 49 * 1000
    parts = bench_floor.elementwise_floor(recorder, torch.bfloat16, reps=1)
    assert parts["gelu"][1] == 1 << 20 and parts["softmax"][1] == 49 * 1000
    assert all(seconds > 0 for seconds, _ in parts.values())
