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
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..io import embedding_cache
from ..predict import Segmenter
from .decoder_routes import add_page_decoding, decoder_export
from .deps import ServerContext
from .embeddings import PRIORITY_BULK, EmbeddingService, model_key
from .images import ImageRejected
from .jobs import Cancelled, Jobs
from .logits import LogitsCache
from .models import ModelSet, ModelSlot, SemanticSamImages, UnknownModel, model_family
from .proposals import FastSamProposals
from .routes import annotations, decode, images, info, projects, transfer
from .schemas import ERROR_RESPONSES
from .security import Guard
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
    proposal_model: Optional[str] = None  # a FastSAM checkpoint / name: proposals from it instead of SAM's grid
    # Access token for writes and for non-loopback clients (a fresh one per start unless given).
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    allowed_hosts: List[str] = field(default_factory=list)  # Host names besides the loopback ones
    allowed_origins: List[str] = field(default_factory=list)  # Origins besides the server's own
    max_json_bytes: int = 16 * 1024 * 1024  # a JSON body (annotations with their masks)
    max_prompt_bytes: int = 1024 * 1024  # a decode or proposals body (a mask input is 350 kB in base64)
    max_jobs: int = 2  # proposals / imports running at once (more get 503)
    job_time_limit_s: float = 300.0  # a proposals or import job is stopped after this long
    clip: Optional[str] = None  # a CLIP file or zoo name for text search (POST /api/images/{id}/find)
    # Further models the page may pick (names or checkpoint files), each loaded on first use
    # (segany/server/models.py); the default is `checkpoint` (or `model`).
    extra_models: List[str] = field(default_factory=list)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def create_app(config: ServerConfig, model: Any = None, clip_model: Any = None) -> FastAPI:
    """The server for `config`; `model` (a loaded SAM-family model) avoids loading it again, as
    `clip_model` (a loaded CLIP model) does config.clip."""
    if not config.token:  # None or empty: never an open server
        config.token = secrets.token_urlsafe(32)
    data_dir = Path(config.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    images_dir = data_dir / "images"
    images_dir.mkdir(exist_ok=True)
    if model is None:
        if config.checkpoint is None:
            raise ValueError("a checkpoint is needed to start the server")
        from ..io.models import load_model

        model = load_model(config.checkpoint, mode=config.mode)
    if model_family(model) != "sam":
        raise ValueError("the server's first (default) model must be a SAM-family model (SAM, MobileSAM, HQ-SAM): "
                         "it embeds the images in the background and makes the proposals; offer Semantic-SAM "
                         "as a further model (segany serve -c vit_b -c semantic-sam-t)")
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
        embeddings=EmbeddingService(segmenter, embedding_cache.cache_dir(data_dir, key), config.memory_embeddings),
        logits_cache=LogitsCache(config.logits_cache),
        jobs=Jobs(config.max_jobs, config.job_time_limit_s),
        fastsam_proposals=FastSamProposals(config.proposal_model, config.mode) if config.proposal_model else None,
    )
    default_name = config.model_name or (str(config.checkpoint) if config.checkpoint else type(model).__name__)
    default = ModelSlot(default_name, model, key, "sam", segmenter, ctx.embeddings, ctx.logits_cache,
                        decoder_export(model, data_dir, config.checkpoint, key))
    ctx.models = ModelSet(default, [str(m) for m in config.extra_models],
                          lambda name: _build_slot(name, config, data_dir))

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
            ctx.models.stop()
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

    for module in (info, projects, images, decode, annotations, transfer):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    add_page_decoding(app, ctx)
    from .find import add_find_route, load_find_clip

    clip_model = clip_model if clip_model is not None else load_find_clip(config.clip, config.mode)
    app.state.text_model = bool(clip_model is not None)
    add_find_route(app, clip_model, ctx.storage, ctx.embeddings, ctx.segmenter, ctx.image_path, config.decode_wait_s)
    info.mount_static(app)

    def body_limit(method: str, path: str, content_type: str) -> int:
        if content_type.startswith("multipart/"):
            return config.max_request_bytes
        if path.endswith(("/decode", "/proposals")):
            return config.max_prompt_bytes
        return config.max_json_bytes

    app.add_middleware(Guard, token=config.token, allowed_hosts=config.allowed_hosts,
                       allowed_origins=config.allowed_origins, body_limit=body_limit)
    return app


def _build_slot(name: str, config: ServerConfig, data_dir: Path) -> ModelSlot:
    """Load a further model the page picked (segany.io.models.load_model: a file or a model name)."""
    from ..io.models import load_model, resolve_checkpoint

    path = resolve_checkpoint(name)
    mode = config.mode
    try:
        model = load_model(path, mode=mode)
    except ValueError as exc:  # Semantic-SAM runs in exact mode only
        if mode == "exact" or "Semantic-SAM" not in str(exc):
            raise
        mode = "exact"
        model = load_model(path, mode=mode)
    key = model_key(path, mode)
    family = model_family(model)
    if family == "semantic-sam":
        return ModelSlot(name, model, key, family, images=SemanticSamImages(model))
    segmenter = Segmenter(model)
    embeddings = EmbeddingService(segmenter, embedding_cache.cache_dir(data_dir, key), config.memory_embeddings)
    embeddings.start()
    return ModelSlot(name, model, key, family, segmenter, embeddings, LogitsCache(config.logits_cache),
                     decoder_export(model, data_dir, path, key))


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line, without echoing the input (it can be megabytes)."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}"[:300])
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc))

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return _error(404, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict):
        return _error(409, str(exc))

    @app.exception_handler(ImageRejected)
    async def _rejected(request: Request, exc: ImageRejected):
        return _error(exc.status, str(exc))

    @app.exception_handler(UnknownModel)
    async def _unknown_model(request: Request, exc: UnknownModel):
        return _error(422, str(exc))

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError):
        return _error(422, str(exc))

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, exc: Cancelled):  # its client is gone: nobody reads this
        return _error(503, str(exc))

    @app.exception_handler(TimeoutError)
    async def _timeout(request: Request, exc: TimeoutError):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})
