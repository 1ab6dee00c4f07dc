"""Routes for decoding in the page: the ONNX prompt decoder, compact embeddings, cross-origin isolation.

    GET /api/decoder                         {"available", "url", "key", ...} or {"available": false, "reason"}
    GET /api/decoder/{key}.onnx              the graph (immutable: its URL names the model)
    GET /api/images/{id}/embedding.safetensors?dtype=float16|float32
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


def page_decoding_router(
    decoder: DecoderExport,
    storage: Any,
    embeddings: Any,
    image_path: Callable[[Dict[str, Any]], Path],
    model_key: str,
    wait_s: float,
) -> APIRouter:
    router = APIRouter()

    @router.get("/api/decoder", summary="Whether the page can decode itself, and where its ONNX decoder is")
    def decoder_info() -> Dict[str, Any]:
        return decoder.describe()

    @router.get("/api/decoder/{key}.onnx", summary="The model's prompt decoder as ONNX (exported once, cached)",
                response_class=Response, responses=BINARY_RESPONSES)
    def decoder_file(key: str, request: Request):
        if not decoder.available:
            return JSONResponse({"detail": decoder.describe()["reason"]}, status_code=404)
        if key != decoder.key:
            return JSONResponse({"detail": f"no decoder {key!r}: this server runs model {decoder.key}"}, status_code=404)
        etag = f'"{decoder.key}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        try:
            path = decoder.ensure()
        except RuntimeError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return FileResponse(path, media_type="application/octet-stream", headers=headers)

    @router.get(
        "/api/images/{image_id}/embedding.safetensors",
        summary="The image embedding for in-page decoding (safetensors; sizes in its metadata)",
        response_class=Response, responses=BINARY_RESPONSES,
    )
    def embedding_download(
        image_id: int, request: Request, dtype: str = Query(default="float16", pattern="^(float16|float32)$")
    ):
        image = storage.image(image_id)
        etag = f'"{model_key}-{image["sha256"][:32]}-{dtype}"'
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        embedding = embeddings.get(image["sha256"], image_path(image), wait_s)
        return Response(embedding_file(embedding, dtype), media_type="application/octet-stream", headers=headers)

    return router


def add_page_decoding(
    app: FastAPI,
    *,
    model: Any,
    data_dir: Path,
    checkpoint: Optional[Path],
    model_key: str,
    storage: Any,
    embeddings: Any,
    image_path: Callable[[Dict[str, Any]], Path],
    wait_s: float,
) -> DecoderExport:
    """Register the routes and the isolation headers on `app`; returns the decoder export."""
    file_backed = checkpoint is not None and Path(checkpoint).is_file()
    checkpoint_hash = model_key.split("-")[0] if file_backed else None
    decoder = DecoderExport(model, Path(data_dir) / "decoders", checkpoint if file_backed else None, checkpoint_hash)
    app.state.decoder_export = decoder
    app.include_router(page_decoding_router(decoder, storage, embeddings, image_path, model_key, wait_s),
                       responses=ERROR_RESPONSES)

    app.add_middleware(PageIsolation)
    return decoder
