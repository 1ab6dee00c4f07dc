"""Routes for decoding in the page: the ONNX prompt decoder, compact embeddings, cross-origin isolation.

    GET /api/decoder?model=NAME              {"available", "url", "key", ...} or {"available": false, "reason"}
    GET /api/decoder/{key}.onnx              the graph (immutable: its URL names the model); also the
                                             once-per-image graph, {key}-image.onnx
    GET /api/images/{id}/embedding.safetensors?dtype=float16|float32&model=NAME
                                             the image embedding (waits for it like decode does)

Both files carry an ETag and answer If-None-Match with 304. The page keeps them in its own cache too.
The page and its static files are served cross-origin isolated (COOP/COEP) so that ONNX Runtime Web
may run its WebAssembly on several threads (SharedArrayBuffer needs it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from .deps import Ctx
from .onnx_decoder import DecoderExport, embedding_file
from .schemas import ERROR_RESPONSES

# The two files are bytes, not JSON; 304 answers a matching If-None-Match.
BINARY_RESPONSES: Dict[Any, Dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "The file"},
    304: {"description": "Not modified (If-None-Match matched the ETag)"},
}

ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


class PageIsolation:
    """ASGI middleware adding COOP/COEP to the page and its static files. Pure ASGI (not
    BaseHTTPMiddleware), so that the request body streams through untouched to the guard's size limit."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/" or path.startswith("/static/")):
            await self.app(scope, receive, send)
            return

        async def send_isolated(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in ISOLATION_HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_isolated)


def _not_modified(request: Request, etag: str) -> bool:
    wanted = request.headers.get("if-none-match", "")
    return etag in [tag.strip() for tag in wanted.split(",")] or wanted.strip() == "*"


def page_decoding_router() -> APIRouter:
    router = APIRouter()

    @router.get("/api/decoder", summary="Whether the page can decode itself for a model, and where its ONNX decoder is")
    def decoder_info(ctx: Ctx, model: Optional[str] = Query(default=None, max_length=1000)) -> Dict[str, Any]:
        slot = ctx.slot(model)
        if slot.decoder is None:
            return {"available": False, "model": slot.name,
                    "reason": f"{slot.name} ({slot.family}) has no ONNX prompt decoder: its clicks decode on the server"}
        return {**slot.decoder.describe(), "model": slot.name}

    @router.get("/api/decoder/{key}.onnx", summary="A model's prompt decoder as ONNX (exported once, cached)",
                response_class=Response, responses=BINARY_RESPONSES)
    def decoder_file(key: str, request: Request, ctx: Ctx):
        decoder = ctx.models.find_decoder(key)
        if decoder is None:
            slots = [s for s in ctx.models.loaded() if s.decoder is not None]
            loaded = [s.decoder.key for s in slots if s.decoder.reason is None]
            why = [f"{s.name}: {s.decoder.reason}" for s in slots if s.decoder.reason is not None]
            return JSONResponse({"detail": f"no decoder {key[:80]!r}: the loaded models' decoders are "
                                           f"{', '.join(loaded) or 'none'}" + "".join(f"; {w}" for w in why)},
                                status_code=404)
        if not decoder.available:
            return JSONResponse({"detail": decoder.describe()["reason"]}, status_code=404)
        etag = f'"{key}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        try:
            path = decoder.ensure(key)
        except RuntimeError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return FileResponse(path, media_type="application/octet-stream", headers=headers)

    @router.get(
        "/api/images/{image_id}/embedding.safetensors",
        summary="The image embedding for in-page decoding (safetensors; sizes in its metadata)",
        response_class=Response, responses=BINARY_RESPONSES,
    )
    def embedding_download(
        image_id: int, request: Request, ctx: Ctx,
        dtype: str = Query(default="float16", pattern="^(float16|float32)$"),
        model: Optional[str] = Query(default=None, max_length=1000),
    ):
        image = ctx.storage.image(image_id)
        slot = ctx.slot(model)
        if slot.embeddings is None:
            raise ValueError(f"{slot.name} ({slot.family}) has no SAM image embedding: its clicks decode on the server")
        etag = f'"{slot.key}-{image["sha256"][:32]}-{dtype}"'
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        embedding = slot.embeddings.get(image["sha256"], ctx.image_path(image), ctx.config.decode_wait_s)
        return Response(embedding_file(embedding, dtype), media_type="application/octet-stream", headers=headers)

    return router


def decoder_export(model: Any, data_dir: Path, checkpoint: Optional[Path], model_key: str) -> DecoderExport:
    """The (lazily exported) ONNX decoder of one SAM-family model, cached under <data>/decoders/."""
    file_backed = checkpoint is not None and Path(checkpoint).is_file()
    checkpoint_hash = model_key.split("-")[0] if file_backed else None
    return DecoderExport(model, Path(data_dir) / "decoders", checkpoint if file_backed else None, checkpoint_hash)


def add_page_decoding(app: FastAPI, ctx: Any) -> DecoderExport:
    """Register the routes and the isolation headers on `app`; returns the default model's decoder export."""
    app.state.decoder_export = ctx.models.default.decoder
    app.include_router(page_decoding_router(), responses=ERROR_RESPONSES)
    app.add_middleware(PageIsolation)
    return ctx.models.default.decoder
