"""`segany eval`: the SAM paper's zero-shot protocols on benchmark datasets, with reports.

    segany eval run -c vit_b --dataset grabcut --dataset davis345 --protocol single-point \\
        --protocol interactive --max-clicks 20 --out eval-out/
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import click

PROTOCOL_CHOICES = ("single-point", "interactive", "box", "proposals")


@click.group("eval")
def eval_group() -> None:
    """Evaluate a model on benchmark datasets (see docs/eval.md)."""


@eval_group.command("run")
@click.option("-c", "--checkpoint", required=True, metavar="CKPT",
              help="Checkpoint file (.pth or .safetensors) or a model name such as vit_b.")
@click.option("-d", "--dataset", "datasets", multiple=True, required=True, metavar="NAME|PATH",
              help="grabcut, davis345, coco, or a path (mask folders with images/ and masks/, a COCO JSON, "
                   "or a COCO root). Repeat for several.")
@click.option("-p", "--protocol", "protocols", multiple=True, type=click.Choice(PROTOCOL_CHOICES),
              help="Protocol(s) to run; repeat for several. Default: single-point and interactive.")
@click.option("--max-clicks", default=20, show_default=True, type=click.IntRange(1, 100),
              help="Clicks per instance in the interactive protocol.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images of each dataset.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.json, instances.jsonl, summary.md and the plots.")
@click.option("--fast", is_flag=True, help="Use the fast CPU mode of the model.")
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cpu or cuda.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding grabcut/, davis345/, coco-mini/ (default: $SEGANY_DATASETS, ./datasets "
                   "or ../shared/datasets).")
@click.option("--split", default="val2017", show_default=True, help="COCO split for a COCO root.")
@click.option("--gallery", default=8, show_default=True, type=click.IntRange(0, 64),
              help="Worst cases drawn per protocol.")
@click.option("--points-per-side", default=32, show_default=True, type=click.IntRange(1, 128),
              help="Proposals: everything-mode grid (points per side).")
@click.option("--pred-iou-thresh", default=0.88, show_default=True, type=click.FloatRange(0, 1),
              help="Proposals: keep masks whose predicted IoU is above this.")
@click.option("--stability-thresh", default=0.95, show_default=True, type=click.FloatRange(0, 1),
              help="Proposals: keep masks whose stability score is at least this.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--restart", is_flag=True, help="Ignore the results of an earlier interrupted run in --out.")
def run(checkpoint: str, datasets: Sequence[str], protocols: Sequence[str], max_clicks: int,
        limit: Optional[int], out_dir: Path, fast: bool, device: str, data_root: Optional[Path], split: str,
        gallery: int, points_per_side: int, pred_iou_thresh: float, stability_thresh: float, no_progress: bool,
        restart: bool) -> None:
    """Run evaluation protocols and write the reports.

    Each finished image is logged in OUT/progress/, so running the same command again after an
    interruption continues where it stopped (the worst-case gallery then covers the new images only).
    """
    from tqdm import tqdm

    from ..eval.datasets import CocoDataset, dataset_length, limited, open_dataset
    from ..eval.protocols import (EvalSettings, SeganyPredictor, SeganyProposalGenerator, WorstCases,
                                  evaluate_prompted, evaluate_proposals)
    from ..eval.progress import ProgressLog
    from ..eval.report import build_report, checkpoint_info, write_reports
    from ..io.models import load_model, resolve_checkpoint

    protocols = list(dict.fromkeys(protocols or ("single-point", "interactive")))
    # everything about the input is checked before the (slow) model load
    opened = [(spec, open_dataset(spec, data_root, split)) for spec in datasets]
    if "proposals" in protocols:
        not_coco = [spec for spec, ds in opened if not isinstance(ds, CocoDataset)]
        if not_coco:
            raise ValueError(f"the proposals protocol needs COCO-format data; not COCO: {', '.join(not_coco)}")
    path = resolve_checkpoint(checkpoint)
    mode = "fast" if fast else "exact"
    started = time.perf_counter()
    ckpt = checkpoint_info(path)
    model = load_model(path, mode=mode, device=device)
    predictor = SeganyPredictor(model)
    amg = {"points_per_side": points_per_side, "pred_iou_thresh": pred_iou_thresh,
           "stability_score_thresh": stability_thresh}
    generator = SeganyProposalGenerator(model, dict(amg)) if "proposals" in protocols else None
    settings = EvalSettings(max_clicks=max_clicks)
    prompted = [p for p in protocols if p != "proposals"]
    worst = {p: WorstCases(gallery) for p in prompted}
    results: Dict[str, Dict[str, Dict]] = {}
    def progress_log(name: str, spec: str, group: Sequence[str]) -> ProgressLog:
        run_key = {"sha256": ckpt["sha256"], "mode": mode, "device": device, "dataset": str(spec),
                   "split": split, "protocols": list(group), "max_clicks": max_clicks}
        if "proposals" in group:
            run_key["everything"] = amg
        log_path = out_dir / "progress" / f"{_safe(name)}.{'+'.join(group)}.jsonl"
        if restart and log_path.is_file():
            log_path.unlink()
        return ProgressLog(log_path, run_key)

    for spec, dataset in opened:
        name = getattr(dataset, "name", str(spec))
        total = dataset_length(dataset, limit)
        coco = dataset.coco if isinstance(dataset, CocoDataset) else None
        results[name] = {}
        if prompted:
            log = progress_log(name, spec, prompted)
            with tqdm(total=total, desc=f"{name} ({', '.join(prompted)})", unit="img",
                      disable=no_progress) as bar:
                results[name].update(evaluate_prompted(predictor, limited(dataset, limit), prompted, name, settings,
                                                       coco=coco, worst=worst, on_image=lambda _: bar.update(),
                                                       done=log.done, on_records=log.append))
        if generator is not None:
            log = progress_log(name, spec, ["proposals"])
            with tqdm(total=total, desc=f"{name} (proposals)", unit="img", disable=no_progress) as bar:
                results[name].update(evaluate_proposals(generator, limited(dataset, limit), coco,
                                                        on_image=lambda _: bar.update(),
                                                        done=log.done, on_records=log.append))
    meta = {
        "model": f"{model.config.variant} {model.config.encoder_kind} (embed {model.config.encoder.embed_dim}, "
                 f"depth {model.config.encoder.depth})" if hasattr(model, "config") else type(model).__name__,
        "checkpoint": ckpt,
        "mode": mode,
        "device": device,
        "datasets": {getattr(ds, "name", str(spec)): str(getattr(ds, "root", getattr(ds, "annotation_file", spec)))
                     for spec, ds in opened},
        "protocols": protocols,
        "settings": {"max_clicks": max_clicks, "limit": limit, "first_click_multimask": True,
                     "thresholds": [0.85, 0.90], "split": split,
                     **({"everything": amg} if "proposals" in protocols else {})},
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    report = build_report(meta, results)
    galleries = {p: w.cases() for p, w in worst.items()}
    paths = write_reports(out_dir, report, results, galleries)
    if report.get("warning"):
        click.echo(f"warning: {report['warning']}", err=True)
    click.echo(Path(paths["markdown"]).read_text())
    click.echo(f"reports written to {out_dir}/ (results.json, instances.jsonl, summary.md, plots)")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
