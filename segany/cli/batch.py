"""The batch side of `segany everything` (--ray, manifests, tar shards, Parquet) and `segany embed`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import click

BATCH_FORMATS = ("parquet", "sa1b+parquet")
BATCH_SUFFIXES = {".csv", ".jsonl", ".ndjson", ".tar"}


def ray_options(func):
    """--ray [ADDRESS] and the actor pool's options, shared by `everything` and `embed`."""
    options = [
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                     help="Run on Ray: alone, a local Ray on this machine; with an address (host:port, ray://..., "
                     "auto) or RAY_ADDRESS set, that cluster. Needs pip install 'segany[ray]'."),
        click.option("--actors", type=click.IntRange(1), default=None,
                     help="Ray: model replicas (default: as many as the cluster's CPUs or GPUs allow)."),
        click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True,
                     help="Images per worker call (the unit redone if a Ray actor dies)."),
        click.option("--cpus-per-actor", type=click.FloatRange(min=0.5), default=None,
                     help="Ray: CPUs (torch threads) per replica (default 1 with a GPU, else up to 4)."),
        click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Ray: GPUs per replica (e.g. 1, or 0.5 for two replicas per GPU)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def wants_batch(paths: Sequence[str], fmt: str, ray_address: Optional[str]) -> bool:
    """Whether `everything` runs through segany.batch: Ray, Parquet, manifests, tar shards or URLs."""
    return (ray_address is not None or fmt in BATCH_FORMATS
            or any(Path(p).suffix.lower() in BATCH_SUFFIXES or "://" in p for p in paths))


def _ray(ray_address, actors, batch_size, cpus_per_actor, gpus_per_actor):
    from ..batch import RayOptions

    if ray_address is None:
        if actors is not None or cpus_per_actor is not None or gpus_per_actor:
            raise ValueError("--actors, --cpus-per-actor and --gpus-per-actor need --ray")
        return None
    return RayOptions(address=None if ray_address == "local" else ray_address, actors=actors,
                      cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, batch_size=batch_size)


def _run(function, *args, **kwargs):
    from ..batch.runner import RayRunFailed

    try:
        return function(*args, **kwargs)
    except RayRunFailed as exc:
        raise click.ClickException(f"{exc} (outputs written so far are kept; rerun to resume)") from None


def _report(summary) -> None:
    click.echo(summary.line())
    for error in summary.errors:
        click.echo(f"  failed: {error['id']}: {error['reason']}", err=True)
    if summary.failed:
        raise SystemExit(1)


def run_everything_batch(paths, checkpoint: str, out_dir: str, fmt: str, fast: bool, device: str, recursive: bool,
                         extras: Dict[str, Any], settings: Dict[str, Any], ray_address, actors, batch_size,
                         cpus_per_actor, gpus_per_actor) -> None:
    from ..batch import run_everything

    if fmt == "coco":
        raise ValueError("--format coco runs in-process only; with --ray, manifests or tar shards use "
                         "sa1b, parquet or sa1b+parquet")
    unsupported = [f"--{k.replace('_', '-')}" for k, v in extras.items() if v]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} run in-process only (not with --ray, manifests or tar shards)")
    ray = _ray(ray_address, actors, batch_size, cpus_per_actor, gpus_per_actor)
    summary = _run(run_everything, list(paths), checkpoint, out_dir, fmt=fmt, settings=settings,
                             mode="fast" if fast else "exact", device=device, ray=ray, batch_size=batch_size,
                             recursive=recursive)
    click.echo(f"output in {out_dir}; summary in {out_dir.rstrip('/')}/_segany/summary.json")
    _report(summary)


@click.command("embed")
@click.argument("paths", nargs=-1, required=True)
@click.option("--checkpoint", "-c", required=True, help="Checkpoint file or model name (as given to segany serve).")
@click.option("--data", "data_dir", required=True, help="The annotation server's data folder.")
@click.option("--fast", is_flag=True, help='Embed with mode="fast" (for a server started with --fast).')
@click.option("--device", default="cpu", show_default=True)
@click.option("--recursive", "-r", is_flag=True, help="Search folders recursively.")
@ray_options
def embed(paths, checkpoint: str, data_dir: str, fast: bool, device: str, recursive: bool, ray_address, actors,
          batch_size, cpus_per_actor, gpus_per_actor) -> None:
    """Precompute the annotation server's embedding cache for PATHS (images, folders, lists, manifests, tars).

    \b
    Examples:
      segany embed photos/ -c vit_b --data project-data/
      segany embed manifest.csv -c vit_b --data project-data/ --ray
    """
    from ..batch import run_embed

    ray = _ray(ray_address, actors, batch_size, cpus_per_actor, gpus_per_actor)
    summary = _run(run_embed, list(paths), checkpoint, data_dir, mode="fast" if fast else "exact", device=device,
                        ray=ray, batch_size=batch_size, recursive=recursive)
    _report(summary)
