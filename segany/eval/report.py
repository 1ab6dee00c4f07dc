"""Evaluation reports: results.json (every figure with what produced it), summary.md, PNG plots."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..io.atomic import atomic_write, atomic_write_text

PathLike = Union[str, os.PathLike]

# SHA-256 of the released checkpoints (the files as published by their authors).
KNOWN_CHECKPOINTS: Dict[str, str] = {
    "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e": "SAM ViT-H (sam_vit_h_4b8939.pth)",
    "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622": "SAM ViT-L (sam_vit_l_0b3195.pth)",
    "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912": "SAM ViT-B (sam_vit_b_01ec64.pth)",
    "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f": "MobileSAM (mobile_sam.pt)",
}

UNKNOWN_CHECKPOINT_WARNING = (
    "The checkpoint is not a known released one (its SHA-256 matches none of the published SAM / "
    "MobileSAM files): these figures describe this file only. With random or test weights they mean "
    "nothing about segment-anything models."
)


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_info(path: PathLike) -> Dict[str, Any]:
    sha = sha256_file(path)
    released = KNOWN_CHECKPOINTS.get(sha)
    return {"path": str(path), "sha256": sha, "released": released,
            "warning": None if released else UNKNOWN_CHECKPOINT_WARNING}


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_report(meta: Dict[str, Any], results: Dict[str, Dict[str, Dict]]) -> Dict[str, Any]:
    """meta: model, checkpoint (checkpoint_info), mode, settings...; results[dataset][protocol] =
    {"summary": ..., "records": ...}. The records go to instances.jsonl, not into the report."""
    from .. import __version__

    report = {
        "segany_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "warning": (meta.get("checkpoint") or {}).get("warning"),
        "results": {ds: {p: r["summary"] for p, r in protos.items()} for ds, protos in results.items()},
    }
    return _clean(report)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_summary(report: Dict[str, Any]) -> str:
    lines: List[str] = ["# segany evaluation", ""]
    ckpt = report.get("checkpoint") or {}
    lines += [f"- model: {report.get('model', '?')}",
              f"- checkpoint: `{Path(ckpt.get('path', '?')).name}` (SHA-256 `{ckpt.get('sha256', '?')[:16]}…`)"
              + (f", released: {ckpt['released']}" if ckpt.get("released") else ", not a released checkpoint"),
              f"- mode: {report.get('mode', '?')}"]
    settings = report.get("settings") or {}
    if settings:
        lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if report.get("wall_time_s") is not None:
        lines.append(f"- wall time: {report['wall_time_s']:.1f} s")
    lines.append("")
    if report.get("warning"):
        lines += [f"> **Warning:** {report['warning']}", ""]
    results = report.get("results", {})

    def rows(protocol: str):
        return [(ds, protos[protocol]) for ds, protos in results.items() if protocol in protos]

    sp = rows("single-point")
    if sp:
        lines += ["## Single point (valid mask)", "",
                  "| dataset | instances | mIoU (top score) | mIoU (oracle, best of 3) |", "|---|---:|---:|---:|"]
        lines += [f"| {ds} | {s['instances']} | {_fmt(s['mIoU'])} | {_fmt(s['mIoU_oracle'])} |" for ds, s in sp]
        lines.append("")
    it = rows("interactive")
    if it:
        max_clicks = max(s["max_clicks"] for _, s in it)
        ks = [k for k in (1, 2, 3, 5, 10, 20) if k <= max_clicks]
        if max_clicks not in ks:
            ks.append(max_clicks)
        lines += [f"## Interactive (up to {max_clicks} clicks)", "",
                  "| dataset | instances | NoC@85 | NoC@90 | NoF@85 | NoF@90 | "
                  + " | ".join(f"mIoU@{k}" for k in ks) + " |",
                  "|---|---:|---:|---:|---:|---:|" + "---:|" * len(ks)]
        for ds, s in it:
            curve = s.get("mIoU@k", {})
            lines.append(f"| {ds} | {s['instances']} | {_fmt(s.get('NoC@85'), 2)} | {_fmt(s.get('NoC@90'), 2)} | "
                         f"{_fmt(s.get('NoF@85'))} | {_fmt(s.get('NoF@90'))} | "
                         + " | ".join(_fmt(curve.get(str(k))) for k in ks) + " |")
        lines += ["", "NoC@t: mean number of clicks to reach IoU t (max clicks when never reached); "
                  "NoF@t: instances that never reach t.", ""]
    bx = rows("box")
    if bx:
        lines += ["## Oracle box", "", "| dataset | instances | mIoU | mask AP | AP50 | AP75 |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {ds} | {s['instances']} | {_fmt(s['mIoU'])} | {_fmt(s.get('AP'))} | {_fmt(s.get('AP50'))} | "
                  f"{_fmt(s.get('AP75'))} |" for ds, s in bx]
        lines.append("")
    pr = rows("proposals")
    if pr:
        lines += ["## Object proposals (everything mode)", "",
                  "| dataset | images | proposals/image | AR@10 | AR@100 | AR@1000 |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {ds} | {s['images']} | {_fmt(s['mean_proposals'], 1)} | {_fmt(s.get('AR@10'))} | "
                  f"{_fmt(s.get('AR@100'))} | {_fmt(s.get('AR@1000'))} |" for ds, s in pr]
        lines.append("")
    plots = report.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots (matplotlib, optional)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(fig, path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")


def plot_click_curves(report: Dict[str, Any], path: PathLike) -> bool:
    """mIoU vs number of clicks, one line per dataset. False when there is nothing to plot."""
    plt = _pyplot()
    curves = {ds: protos["interactive"]["curve"] for ds, protos in report.get("results", {}).items()
              if "interactive" in protos and protos["interactive"].get("curve")}
    if plt is None or not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for ds, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=ds)
    for t in (0.85, 0.90):
        ax.axhline(t, color="grey", linewidth=0.6, linestyle=":")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"mIoU vs clicks — {report.get('model', '')}")
    _save_figure(fig, Path(path))
    plt.close(fig)
    return True


def plot_gallery(cases: Sequence[Any], path: PathLike, title: str) -> bool:
    """Worst cases: the image with ground truth (green outline), prediction (red fill) and prompts
    (positive clicks green circles, negative clicks red crosses, boxes yellow)."""
    plt = _pyplot()
    if plt is None or not cases:
        return False
    import cv2

    cols = min(4, len(cases))
    rows_n = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, case in zip(axes.ravel(), cases):
        shown = case.image.astype(np.float32)
        red = np.array([255, 40, 40], dtype=np.float32)
        shown[case.pred] = 0.55 * shown[case.pred] + 0.45 * red
        contours, _ = cv2.findContours(case.gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        ax.imshow(shown.astype(np.uint8))
        for contour in contours:
            pts = contour[:, 0, :]
            ax.plot(np.append(pts[:, 0], pts[0, 0]), np.append(pts[:, 1], pts[0, 1]), color="lime", linewidth=1)
        for c in case.clicks:
            if c.positive:
                ax.scatter([c.x], [c.y], s=36, facecolors="lime", edgecolors="black", linewidths=0.8)
            else:
                ax.scatter([c.x], [c.y], s=40, marker="X", color="red", edgecolors="white", linewidths=0.6)
        if case.box is not None:
            x0, y0, x1, y1 = case.box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.2))
        ax.set_title(f"{case.dataset}/{case.image_id}  IoU {case.iou:.2f}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save_figure(fig, Path(path))
    plt.close(fig)
    return True


def write_reports(out_dir: PathLike, report: Dict[str, Any], results: Dict[str, Dict[str, Dict]],
                  galleries: Optional[Dict[str, Sequence[Any]]] = None) -> Dict[str, Path]:
    """Write results.json, instances.jsonl, summary.md and the plots into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: List[str] = []
    if plot_click_curves(report, out / "miou_vs_clicks.png"):
        plots.append("miou_vs_clicks.png")
    for protocol, cases in (galleries or {}).items():
        name = f"worst_{protocol}.png"
        if plot_gallery(cases, out / name, f"worst cases — {protocol}"):
            plots.append(name)
    report = dict(report, plots=plots)
    if _pyplot() is None:
        report["plots_note"] = "matplotlib is not installed (pip install 'segany[plots]'): no plots"
    lines = []
    for ds, protos in results.items():
        for protocol, r in protos.items():
            for rec in r.get("records", []):
                lines.append(json.dumps(_clean({"dataset": ds, "protocol": protocol, **rec})))
    paths = {"json": out / "results.json", "instances": out / "instances.jsonl", "markdown": out / "summary.md"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["instances"], "\n".join(lines) + ("\n" if lines else ""))
    atomic_write_text(paths["markdown"], markdown_summary(report))
    return paths
