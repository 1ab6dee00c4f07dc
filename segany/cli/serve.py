"""`segany serve`: the annotation server and browser tool."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import click


@click.command("serve")
@click.option("--checkpoint", required=True, help="Checkpoint file or model name.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("segany-data"),
              show_default=True, help="Data folder: database, images, embedding cache.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--fast", is_flag=True, help="Load the model in the fast (approximate) mode instead of exact.")
@click.option("--import-root", "import_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder that folder import may read from (repeatable; default: the data folder and the "
              "current folder).")
@click.option("--max-upload-mb", type=click.IntRange(1, 4096), default=50, show_default=True,
              help="Largest image file accepted.")
@click.option("--clip", metavar="NAME_OR_PATH", help="A CLIP model (file or name, e.g. clip_vit_b32) for text search "
              "among proposals (POST /api/images/{id}/find).")
def serve(checkpoint: str, data_dir: Path, host: str, port: int, fast: bool, import_roots: Tuple[Path, ...],
          max_upload_mb: int, clip: Optional[str] = None) -> None:
    """Run the annotation server; open http://HOST:PORT/ in a browser."""
    try:
        import uvicorn
    except ImportError:
        raise click.UsageError("the server needs its extra: pip install 'segany[server]'") from None
    from ..io.models import load_model, resolve_checkpoint
    from ..server import ServerConfig, create_app

    mode = "fast" if fast else "exact"
    path = resolve_checkpoint(checkpoint)
    model = load_model(path, mode=mode)
    roots = list(import_roots) or [data_dir, Path.cwd()]
    config = ServerConfig(
        data_dir=data_dir, checkpoint=path, mode=mode, import_roots=roots,
        max_upload_bytes=max_upload_mb * 1024 * 1024, model_name=str(checkpoint), clip=clip,
    )
    app = create_app(config, model=model)
    click.echo(f"segany annotator on http://{host}:{port}/  (data: {data_dir.resolve()})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
