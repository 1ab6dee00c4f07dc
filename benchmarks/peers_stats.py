"""The peer benchmark's arithmetic: the interleaved schedule, medians, agreement and the ratios to the best peer.

No model code here: bench_peers.py runs the processes, peers_backends.py the backends.
"""
from __future__ import annotations

import statistics

import numpy as np

# The backends a CPU user would pick instead of segany; segany's own modes are compared against them.
PEERS = ("released", "ort-fp32", "ort-int8", "ov-bf16", "ov-f32")
SEGANY = ("segany-exact", "segany-fast")
BACKENDS = PEERS + SEGANY
ROWS = ("encoder", "click", "prompts64", "everything")
ROW_LABELS = {
    "encoder": "encoder (set_image)",
    "click": "one click, masks at full size",
    "prompts64": "64 prompts, per prompt",
    "everything": "everything mode",
}


def schedule(backends, rounds: int):
    """(round, backend) pairs, every backend once per round before the next round starts.

    The backend order rotates from round to round, so that a backend is not always the one that runs
    right after (say) the slowest one while the machine's load drifts.
    """
    backends = list(backends)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if len(set(backends)) != len(backends):
        raise ValueError(f"backends repeat: {backends}")
    order = []
    for r in range(rounds):
        shift = r % len(backends) if backends else 0
        order += [(r, b) for b in backends[shift:] + backends[:shift]]
    return order


def medians(samples: dict) -> dict:
    """{backend: {row: [seconds, ...]}} -> {backend: {row: (median, min, max)}}; rows without samples dropped."""
    out = {}
    for backend, rows in samples.items():
        out[backend] = {
            row: (statistics.median(values), min(values), max(values)) for row, values in rows.items() if values
        }
    return out


def rel_l2(reference, other) -> float:
    """||other - reference|| / ||reference|| in float64."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if reference.shape != other.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {other.shape}")
    return float(np.linalg.norm(other - reference) / max(np.linalg.norm(reference), 1e-12))


def mask_iou(reference_logits, other_logits, confident: float = 0.05) -> float:
    """IoU of the masks (logit > 0) where the reference is confident (|logit| > `confident`)."""
    reference_logits, other_logits = np.asarray(reference_logits), np.asarray(other_logits)
    if reference_logits.shape != other_logits.shape:
        raise ValueError(f"shapes differ: {reference_logits.shape} vs {other_logits.shape}")
    keep = np.abs(reference_logits) > confident
    a, b = (reference_logits > 0) & keep, (other_logits > 0) & keep
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def best_peer(row_times: dict):
    """(backend, seconds) of the fastest peer in {backend: seconds}; None where no peer has the row."""
    timed = [(t, b) for b, t in row_times.items() if b in PEERS and t is not None]
    if not timed:
        return None
    t, b = min(timed)
    return b, t


def ratios_to_best_peer(row_times: dict) -> dict:
    """{segany backend: best peer's time / its time} (> 1: segany is ahead) for the segany modes that have the row."""
    best = best_peer(row_times)
    if best is None:
        return {}
    return {b: best[1] / row_times[b] for b in SEGANY if row_times.get(b)}


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_cell(stat) -> str:
    if stat is None:
        return "n/a"
    median, lo, hi = stat
    if hi > lo:
        return f"{fmt_time(median)} ({fmt_time(lo)}-{fmt_time(hi)})"
    return fmt_time(median)


def table(model: str, stats: dict, backends, rows) -> str:
    """Markdown: one line per row, one column per backend, then the best peer and segany's ratios to it."""
    backends = [b for b in backends if b in stats]
    head = ["row"] + backends + ["best peer", "exact / best peer", "fast / best peer"]
    lines = [f"**{model}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = {b: stats[b].get(row) for b in backends}
        if all(c is None for c in cells.values()):
            continue
        row_medians = {b: (c[0] if c else None) for b, c in cells.items()}
        best = best_peer(row_medians)
        ratio = ratios_to_best_peer(row_medians)
        line = [ROW_LABELS.get(row, row)] + [fmt_cell(cells[b]) for b in backends]
        line.append(f"{best[0]} {fmt_time(best[1])}" if best else "n/a")
        line += [f"{ratio[b]:.2f}x" if b in ratio else "n/a" for b in SEGANY]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def agreement_table(model: str, agreement: dict) -> str:
    """Markdown: each backend's embedding and click agreement with the released float32 code."""
    lines = [
        f"| {model}: agreement with released fp32 | embedding rel. L2 | click low-res logits rel. L2 | click mask IoU |",
        "|---|---|---|---|",
    ]
    for backend, values in agreement.items():
        shown = [f"{values[k]:.3g}" if values.get(k) is not None else "n/a" for k in ("embedding", "click", "iou")]
        lines.append(f"| {backend} | " + " | ".join(shown) + " |")
    return "\n".join(lines)
