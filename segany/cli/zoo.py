"""`segany models` and `segany download NAME`."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import click

from ..io import zoo

_CACHE_HELP = "Checkpoint cache folder (default: $SEGANY_HOME/checkpoints or the user cache directory)."


@click.command("models")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help=_CACHE_HELP)
def models(cache_dir: Optional[Path]) -> None:
    """List the known checkpoints: name, size, licence, whether cached, source URL."""
    rows = [("NAME", "FAMILY", "SIZE", "LICENCE", "CACHED", "SOURCE")]
    for entry in zoo.REGISTRY.values():
        rows.append(
            (
                entry.name,
                entry.family,
                zoo.human_size(entry.size),
                entry.licence,
                "yes" if zoo.is_cached(entry, cache_dir) else "no",
                zoo.entry_url(entry),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    click.echo(f"\ncache: {cache_dir or zoo.cache_dir()}")


@click.command("download")
@click.argument("name")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help=_CACHE_HELP)
@click.option("--base-url", default=None, help="Mirror serving the files by name (default: $SEGANY_MODEL_BASE_URL, "
              "else the official URL).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def download(name: str, cache_dir: Optional[Path], base_url: Optional[str], quiet: bool) -> None:
    """Download checkpoint NAME (see `segany models`) into the cache and print its path."""
    entry = zoo.get_entry(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", zoo.UnverifiedDownloadWarning)
        path = zoo.download(entry, cache=cache_dir, base_url=base_url, progress=not quiet)
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    click.echo(str(path))
