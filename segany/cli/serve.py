"""`segany serve`: the annotation server and browser tool."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import click


@click.command("serve")
@click.option("-c", "--checkpoint", "checkpoints", required=True, multiple=True,
              help="Checkpoint file or model name. Repeat it to offer several models in the page's picker "
              "(e.g. -c vit_b -c vit_t -c semantic-sam-t): the first is the default, the others load on first use.")
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
@click.option("--proposal-model", default=None, metavar="CKPT",
              help="A FastSAM checkpoint or name (e.g. fastsam-s) for everything-mode proposals instead of SAM's grid.")
@click.option("--clip", metavar="NAME_OR_PATH", help="A CLIP model (file or name, e.g. clip_vit_b32) for text search "
              "among proposals (POST /api/images/{id}/find).")
@click.option("--token", envvar="SEGANY_TOKEN", default=None,
              help="Access token clients send (Authorization: Bearer TOKEN) [env SEGANY_TOKEN; default: a new "
              "random one per start, printed in the URL]. Needed to listen on a non-loopback address.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Host name clients may use besides 127.0.0.1, localhost and [::1] (repeatable).")
def serve(checkpoints: Tuple[str, ...], data_dir: Path, host: str, port: int, fast: bool, import_roots: Tuple[Path, ...],
          max_upload_mb: int, proposal_model: Optional[str], token: Optional[str],
          allowed_hosts: Tuple[str, ...], clip: Optional[str] = None) -> None:
    """Run the annotation server; open the printed http://HOST:PORT/#token=... in a browser."""
    try:
        import uvicorn
    except ImportError:
        raise click.UsageError("the server needs its extra: pip install 'segany[server]'") from None
    from ..io.models import load_model, resolve_checkpoint
    from ..server import ServerConfig, create_app
    from ..server.security import is_loopback_address

    if token is not None and len(token.strip()) < 16:
        raise click.BadParameter("the token must have at least 16 characters", param_hint="--token")
    if not is_loopback_address(host) and token is None:
        raise click.UsageError(f"listening on {host} (not loopback) needs an explicit --token or SEGANY_TOKEN")
    hosts = list(allowed_hosts)
    if not is_loopback_address(host) and host not in ("0.0.0.0", "::"):
        hosts.append(host)  # the address it listens on is a name clients may use

    mode = "fast" if fast else "exact"
    checkpoint, *others = checkpoints
    path = resolve_checkpoint(checkpoint)
    for other in others:
        resolve_checkpoint(other)  # a missing file or unknown name fails now, not when the page picks it
    model = load_model(path, mode=mode)
    if proposal_model is not None:
        resolve_checkpoint(proposal_model)  # a missing file or unknown name fails now, not at the first request
    roots = list(import_roots) or [data_dir, Path.cwd()]
    config = ServerConfig(
        data_dir=data_dir, checkpoint=path, mode=mode, import_roots=roots,
        max_upload_bytes=max_upload_mb * 1024 * 1024, model_name=str(checkpoint), allowed_hosts=hosts,
        proposal_model=proposal_model, clip=clip, extra_models=list(dict.fromkeys(o for o in others if o != checkpoint)),
    )
    if token is not None:
        config.token = token.strip()
    app = create_app(config, model=model)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"segany annotator on http://{shown}:{port}/#token={config.token}  (data: {data_dir.resolve()})",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
