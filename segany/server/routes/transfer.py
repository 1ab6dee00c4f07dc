"""Project data out (COCO instances, SA-1B per image) and in (COCO annotations)."""
from __future__ import annotations

import json
from typing import Any, Dict

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import Response

from .. import exports
from ..deps import Ctx, User

router = APIRouter(tags=["export and import"])


@router.get("/api/projects/{project_id}/export/coco", summary="COCO instances JSON of the project")
def export_coco(project_id: int, ctx: Ctx) -> Response:
    storage = ctx.storage
    project = storage.project(project_id)
    data = exports.coco_instances(project, storage.images(project_id), storage.labels(project_id),
                                  storage.project_annotations(project_id))
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in project["name"]) or "project"
    return Response(
        json.dumps(data),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{name}_coco.json"'},
    )


@router.get("/api/images/{image_id}/export/sa1b", summary="SA-1B style per-image JSON")
def export_sa1b(image_id: int, ctx: Ctx) -> Dict[str, Any]:
    image = ctx.storage.image(image_id)
    return exports.sa1b_image(image, ctx.storage.annotations(image_id))


@router.post("/api/projects/{project_id}/import/coco", summary="Import COCO annotations for images already in the "
             "project (a cancellable job: closing the connection stops it before anything is written)")
async def import_coco(project_id: int, ctx: Ctx, user: User, request: Request,
                      file: UploadFile = File(...)) -> Dict[str, Any]:
    ctx.storage.project(project_id)

    def work(job):
        file.file.seek(0)
        raw = file.file.read(ctx.config.max_request_bytes + 1)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a JSON file: {exc}") from None
        return exports.import_coco(ctx.storage, project_id, data, user, job)

    return await ctx.jobs.run(request, work)
