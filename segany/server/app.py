"""The annotation server: a FastAPI app over the project database, the image store and the model.

    app = create_app(ServerConfig(data_dir="data", checkpoint="sam_vit_b.pth"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Data folder layout: segany.db (SQLite, WAL), images/<sha256>.<ext>, embeddings/<model key>/<sha256>.safetensors.
The OpenAPI description is at /docs (and /openapi.json); the browser tool at /. The routes live in
segany/server/routes (one router per resource) and share segany/server/deps.py.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..predict import Segmenter
from .deps import ServerContext
from .embeddings import PRIORITY_BULK, EmbeddingService, model_key
from .images import ImageRejected
from .logits import LogitsCache
from .routes import annotations, decode, images, info, projects, transfer
from .storage import Conflict, NotFound, Storage

log = logging.getLogger("segany.server")


@dataclass
class ServerConfig:
    data_dir: Path
    checkpoint: Optional[Path] = None  # the model's file (also the embedding cache key)
    mode: str = "exact"
    max_upload_bytes: int = 50 * 1024 * 1024  # per image file
    max_request_bytes: int = 512 * 1024 * 1024  # a whole upload request (several files)
    max_pixels: int = 64_000_000
    import_roots: List[Path] = field(default_factory=list)  # folders that folder import may read
    memory_embeddings: int = 8  # ImageEmbeddings kept in memory (LRU)
    decode_wait_s: float = 120.0  # how long a decode waits for a missing embedding
    logits_cache: int = 64  # recent decodes whose low-res logits can be fed back as mask input
    model_name: Optional[str] = None  # shown on the page


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def create_app(config: ServerConfig, model: Any = None) -> FastAPI:
    """The server for `config`; `model` (a loaded SAM-family model) avoids loading it again."""
    data_dir = Path(config.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    images_dir = data_dir / "images"
    images_dir.mkdir(exist_ok=True)
    if model is None:
        if config.checkpoint is None:
            raise ValueError("a checkpoint is needed to start the server")
        from ..io.models import load_model

        model = load_model(config.checkpoint, mode=config.mode)
    if config.checkpoint is not None and Path(config.checkpoint).is_file():
        key = model_key(Path(config.checkpoint), config.mode)
    else:  # a model without a file (tests): key its cache by its configuration only
        key = f"unsaved-{type(model).__name__}-{config.mode}"
    segmenter = Segmenter(model)
    ctx = ServerContext(
        config=config,
        model=model,
        model_key=key,
        images_dir=images_dir,
        import_roots=[Path(r).expanduser().resolve() for r in (config.import_roots or [data_dir])],
        storage=Storage(data_dir / "segany.db"),
        segmenter=segmenter,
        embeddings=EmbeddingService(segmenter, data_dir / "embeddings" / key, config.memory_embeddings),
        logits_cache=LogitsCache(config.logits_cache),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.embeddings.start()
        for project in ctx.storage.projects():  # finish what a previous run left
            for image in ctx.storage.images(project["id"]):
                ctx.embeddings.request(image["sha256"], ctx.image_path(image), PRIORITY_BULK)
        try:
            yield
        finally:
            ctx.embeddings.stop()
            ctx.storage.close()

    app = FastAPI(
        title="segany annotation server",
        description="Projects, images, SAM-assisted mask decoding, everything-mode proposals, annotations "
        "(COCO RLE), COCO / SA-1B export and COCO import. The browser tool is served at /.",
        version="1",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.storage = ctx.storage
    app.state.embeddings = ctx.embeddings
    app.state.segmenter = ctx.segmenter
    app.state.config = config
    _install_error_handlers(app)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        # Refuse an oversized request before its body is read (multipart would spool it to disk first).
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > config.max_request_bytes
            except ValueError:
                return _error(400, "invalid Content-Length")
            if too_big:
                return _error(413, f"request body of {length} bytes exceeds the limit of {config.max_request_bytes}")
        return await call_next(request)

    for module in (info, projects, images, decode, annotations, transfer):
        app.include_router(module.router)
    info.mount_static(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return _error(404, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict):
        return _error(409, str(exc))

    @app.exception_handler(ImageRejected)
    async def _rejected(request: Request, exc: ImageRejected):
        return _error(exc.status, str(exc))

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError):
        return _error(422, str(exc))

    @app.exception_handler(TimeoutError)
    async def _timeout(request: Request, exc: TimeoutError):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})
