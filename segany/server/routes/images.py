"""Images: upload, server-side folder import, the file itself, embedding status."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import FileResponse

from ..deps import Ctx, User
from ..embeddings import PRIORITY_BULK, PRIORITY_OPEN
from ..images import ImageRejected, check_image_bytes, display_name, folder_images, resolve_import_folder, store
from ..schemas import FolderImportIn

router = APIRouter(tags=["images"])


@router.get("/api/projects/{project_id}/images", summary="Images with their embedding status and progress")
def list_images(project_id: int, ctx: Ctx) -> Dict[str, Any]:
    items = [ctx.with_status(i) for i in ctx.storage.images(project_id)]
    ready = sum(1 for i in items if i["embedding"] == "ready")
    return {
        "images": items,
        "progress": {"ready": ready, "total": len(items), "seconds_per_image": ctx.embeddings.seconds_per_image},
        "revision": ctx.storage.revision(project_id),
    }


@router.post("/api/projects/{project_id}/images", status_code=201, summary="Upload images (multipart 'files')")
async def upload_images(project_id: int, ctx: Ctx, user: User, files: List[UploadFile] = File(...)) -> Dict[str, Any]:
    config = ctx.config
    ctx.storage.project(project_id)
    # Check every file before storing any, so that a bad file in a batch writes nothing.
    checked = []
    for upload in files:
        name = display_name(upload.filename)
        data = await upload.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise ImageRejected(f"{name}: larger than the limit of {config.max_upload_bytes} bytes", status=413)
        try:
            checked.append((name, check_image_bytes(data, config.max_upload_bytes, config.max_pixels)))
        except ImageRejected as exc:
            raise ImageRejected(f"{name}: {exc}", exc.status) from None
    out = []
    for name, image_bytes in checked:
        stored = store(image_bytes, ctx.images_dir)
        image, created = ctx.storage.add_image(
            project_id, name, stored, image_bytes.sha256, image_bytes.width, image_bytes.height, user
        )
        ctx.embeddings.request(image["sha256"], ctx.image_path(image), PRIORITY_BULK)
        out.append({**ctx.with_status(image), "created": created})
    return {"images": out}


@router.post("/api/projects/{project_id}/import-folder", summary="Import the images of a server-side folder "
             "(a cancellable job); 'skipped' counts files that are not images (hidden ones are never read)")
async def import_folder(project_id: int, body: FolderImportIn, ctx: Ctx, user: User, request: Request) -> Dict[str, Any]:
    config = ctx.config
    ctx.storage.project(project_id)
    folder = resolve_import_folder(body.folder, ctx.import_roots)

    def work(job):
        paths, skipped = folder_images(folder, body.recursive)
        added, existing, rejected = [], [], []
        for path in paths:
            job.check()
            rel = str(path.relative_to(folder))
            try:
                if path.stat().st_size > config.max_upload_bytes:
                    raise ImageRejected(f"larger than {config.max_upload_bytes} bytes", 413)
                image, created = ctx.add_image_bytes(project_id, rel, path.read_bytes(), user)
            except ImageRejected as exc:
                rejected.append({"file": rel, "reason": str(exc)})
                continue
            (added if created else existing).append(image["id"])
        return {"added": added, "existing": existing, "rejected": rejected, "skipped": skipped}

    return await ctx.jobs.run(request, work)


@router.get("/api/images/{image_id}", summary="One image")
def get_image(image_id: int, ctx: Ctx) -> Dict[str, Any]:
    return ctx.with_status(ctx.storage.image(image_id))


@router.get("/api/images/{image_id}/file", summary="The image file", response_class=FileResponse)
def image_file(image_id: int, ctx: Ctx):
    image = ctx.storage.image(image_id)
    return FileResponse(ctx.image_path(image), headers={"Cache-Control": "private, max-age=31536000, immutable"})


@router.get("/api/images/{image_id}/embedding", summary="Embedding status (for `model`; default: the first model)")
def embedding_status(image_id: int, ctx: Ctx, model: Optional[str] = Query(default=None, max_length=1000)) -> Dict[str, Any]:
    image = ctx.storage.image(image_id)
    slot = ctx.slot(model)
    return {"status": slot.embedding_status(image["sha256"]), "error": slot.embedding_error(image["sha256"])}


@router.post("/api/images/{image_id}/embedding", summary="Compute this image's embedding next (for `model`)")
def prioritise_embedding(image_id: int, ctx: Ctx, model: Optional[str] = Query(default=None, max_length=1000)) -> Dict[str, Any]:
    image = ctx.storage.image(image_id)
    return {"status": ctx.slot(model).request_embedding(image["sha256"], ctx.image_path(image), PRIORITY_OPEN)}
