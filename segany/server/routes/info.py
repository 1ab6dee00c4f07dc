"""The model and limits, and the browser tool's static page."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..deps import Ctx

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(tags=["info"])


@router.get("/api/info", summary="Model and limits")
def info(ctx: Ctx, request: Request) -> Dict[str, Any]:
    config = ctx.config
    return {
        "model": config.model_name or (Path(config.checkpoint).name if config.checkpoint else type(ctx.model).__name__),
        "model_key": ctx.model_key,
        "mode": config.mode,
        "max_upload_bytes": config.max_upload_bytes,
        "max_pixels": config.max_pixels,
        "text_model": bool(getattr(request.app.state, "text_model", False)),  # POST /api/images/{id}/find works
        # The models the page may pick (the first is the default; the others load on first use): name,
        # default, loaded and, once loaded, family ("sam" | "semantic-sam"), key, levels (granularity
        # levels; 0: none), decoder ("page": an ONNX decoder for in-page decoding, "server").
        "models": ctx.models.describe(),
        "proposal_model": config.proposal_model,  # FastSAM for proposals, or None (the default model's grid)
    }


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
