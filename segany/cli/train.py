"""`segany train` and `segany distill`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Tuple

import click

DATA_HELP = (
    "coco:ANN.json[,IMAGES] | sa1b:DIR | folder:IMAGES,MASKS[,IGNORE], optionally @START:STOP "
    "(a slice of the sorted records). Repeatable."
)


def _parse_val(specs: Tuple[str, ...], max_objects: int):
    from segany.train.data import eval_objects, parse_data_spec

    sets = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or "," in name:
            raise click.UsageError(f"--val {spec!r}: use NAME=SPEC, e.g. grabcut=folder:IMAGES,MASKS,IGNORE")
        sets[name] = eval_objects(parse_data_spec(rest), max_per_image=max_objects)
    return sets


@click.command()
@click.option("-c", "--checkpoint", required=True, help="Initial model: checkpoint file or model name.")
@click.option("-d", "--data", "data", multiple=True, help="Training data. " + DATA_HELP)
@click.option("--val", multiple=True, help="Validation set NAME=SPEC (same SPEC syntax). Repeatable.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Run folder (model.pth, train_state.pt, log.csv, curves.png).")
@click.option("--mode", type=click.Choice(["decoder", "full", "lora"]), default="decoder", show_default=True,
              help="decoder: frozen encoder with cached embeddings; full: encoder + decoder; lora: adapters on the encoder's qkv.")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--images-per-step", type=int, default=1, show_default=True)
@click.option("--instances", type=int, default=4, show_default=True, help="Instances sampled per image (prompted as one batch).")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.1, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True, help="Warm-up steps before the cosine decay.")
@click.option("--point-rounds", type=int, default=8, show_default=True, help="Rounds adding an error-region point.")
@click.option("--mask-rounds", type=int, default=2, show_default=True, help="Rounds with only the previous mask as prompt.")
@click.option("--box-probability", type=float, default=0.5, show_default=True, help="Chance the first prompt is a noisy box.")
@click.option("--loss-side", type=int, default=None, help="Resolution of the mask loss (default: the model frame, 1024).")
@click.option("--flip/--no-flip", default=True, show_default=True)
@click.option("--scale", "scale_range", type=(float, float), default=(1.0, 1.0), show_default=True, help="Scale-jitter range (then crop).")
@click.option("--min-area", type=int, default=64, show_default=True, help="Smallest instance trained on, in pixels of the model frame.")
@click.option("--lora-rank", type=int, default=4, show_default=True)
@click.option("--lora-alpha", type=float, default=4.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--val-every", type=int, default=100, show_default=True)
@click.option("--val-clicks", type=int, default=3, show_default=True)
@click.option("--val-objects", type=int, default=1, show_default=True, help="Largest objects per validation image.")
@click.option("--save-every", type=int, default=100, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Embedding cache (decoder mode); default OUT/embedding_cache.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its train_state.pt, bit-for-bit.")
@click.option("--stop-after", type=int, default=None, help="Stop (resumably) after this many steps of this call.")
@click.option("--progress/--no-progress", default=True)
@click.option("--plain-modules", is_flag=True,
              help="Run the steps through the plain model definition instead of the engine's training twin (same math, slower).")
def train(checkpoint, data, val, out, mode, steps, images_per_step, instances, lr, weight_decay, warmup,
          point_rounds, mask_rounds, box_probability, loss_side, flip, scale_range, min_area, lora_rank, lora_alpha, seed,
          workers, val_every, val_clicks, val_objects, save_every, cache_dir, threads, resume, stop_after, progress,
          plain_modules):
    """Train or fine-tune a model with SAM's recipe (simulated interactive prompting, focal + dice + IoU losses).

    \b
    Example (decoder only, cached embeddings; the annotation tool's COCO export is a coco: source):
      segany train -c vit_b -d coco:export.json,images/ --val mine=coco:val.json,images/ -o runs/mine
    """
    import torch

    import segany
    from segany.train.data import AugmentConfig, parse_data_spec
    from segany.train.prompts import PromptConfig
    from segany.train.trainer import MODEL_FILE, PLOT_FILE, Trainer, TrainConfig

    if not data:
        raise click.UsageError("give training data with --data (see --help)")
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(
        mode=mode, steps=steps, images_per_step=images_per_step, max_instances=instances, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup, lora_rank=lora_rank, lora_alpha=lora_alpha,
        loss_side=loss_side, seed=seed, workers=workers, val_every=val_every, val_clicks=val_clicks,
        save_every=save_every, cache_dir=cache_dir, training_twin=not plain_modules,
        prompts=PromptConfig(num_point_rounds=point_rounds, num_mask_only_rounds=mask_rounds, box_probability=box_probability),
        augment=AugmentConfig(flip=flip, scale_range=tuple(scale_range), min_instance_area=min_area),
    )
    records = [r for spec in data for r in parse_data_spec(spec)]
    val_sets = _parse_val(val, val_objects)
    model = segany.load_model(checkpoint)
    trainer = Trainer(model, cfg, Path(out), records, val_sets, progress=progress)
    if resume:
        trainer.load_state_dict(Trainer.resume_state(Path(out)))
    elif (Path(out) / "train_state.pt").exists():
        raise click.UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    click.echo(f"training {mode} on {len(records)} images; {sum(p.numel() for p in trainer.params):,} trained parameters", err=True)
    started = time.perf_counter()
    trainer.run(stop_after=stop_after)
    if trainer.cache is not None:
        click.echo(f"embedding cache: {trainer.cache.hits} hits, {trainer.cache.misses} computed", err=True)
    last_val = next((r for r in reversed(trainer.history) if any(k.startswith("val_") for k in r)), {})
    for key, value in last_val.items():
        if key.startswith("val_"):
            click.echo(f"{key[4:]}: {value:.4f}")
    click.echo(f"step {trainer.step}/{cfg.steps} in {time.perf_counter() - started:.0f} s; "
               f"model: {Path(out) / MODEL_FILE}; curves: {Path(out) / PLOT_FILE}")


@click.command()
@click.option("-t", "--teacher", required=True, help="Teacher model: checkpoint file or model name (e.g. vit_h).")
@click.option("-d", "--data", "data", multiple=True, required=True, help="Images to distil on. " + DATA_HELP)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Run folder (model.pth, distill_state.pt, log.csv, curves.png).")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--images-per-step", type=int, default=2, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--flip/--no-flip", default=True, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=int, default=100, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Teacher-embedding cache; default OUT/teacher_cache.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT.")
@click.option("--progress/--no-progress", default=True)
def distill(teacher, data, out, steps, images_per_step, lr, warmup, flip, seed, save_every, cache_dir, threads, resume, progress):
    """Distil a TinyViT image encoder (MobileSAM's vit_t) from a teacher's encoder (embedding MSE).

    The result keeps the teacher's prompt encoder and mask decoder and loads like a MobileSAM checkpoint.
    """
    import torch

    import segany
    from segany.train.data import parse_data_spec
    from segany.train.distill import MODEL_FILE, STATE_FILE, DistillConfig, Distiller

    if threads:
        torch.set_num_threads(threads)
    cfg = DistillConfig(steps=steps, images_per_step=images_per_step, lr=lr, warmup_steps=warmup, flip=flip,
                        seed=seed, save_every=save_every, cache_dir=cache_dir)
    records = [r for spec in data for r in parse_data_spec(spec)]
    distiller = Distiller(segany.load_model(teacher), cfg, Path(out), records, progress=progress)
    if resume:
        distiller.load_state_dict(Distiller.resume_state(Path(out)))
    elif (Path(out) / STATE_FILE).exists():
        raise click.UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    started = time.perf_counter()
    history = distiller.run()
    click.echo(f"step {distiller.step}/{steps}: embedding MSE {history[-1]['loss']:.5g} "
               f"(first {history[0]['loss']:.5g}) in {time.perf_counter() - started:.0f} s; model: {Path(out) / MODEL_FILE}")
