"""The annotation server: a FastAPI app over the project database, the image store and the model.

    app = create_app(ServerConfig(data_dir="data", checkpoint="sam_vit_b.pth"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Data folder layout: segany.db (SQLite, WAL), images/<sha256>.<ext>, embeddings/<model key>/<sha256>.safetensors.
The OpenAPI description is at /docs (and /openapi.json); the browser tool at /.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np
from fastapi import FastAPI, File, Header, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ..predict import Prompt, Segmenter
from ..predict.inputs import check_boxes, check_points
from ..io import embedding_cache
from . import exports, masks
from .embeddings import PRIORITY_BULK, PRIORITY_OPEN, EmbeddingService, model_key
from .images import ImageRejected, check_image_bytes, display_name, folder_images, resolve_import_folder, store
from .storage import Conflict, NotFound, Storage

log = logging.getLogger("segany.server")
STATIC_DIR = Path(__file__).resolve().parent / "static"


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


# ----------------------------------------------------------------------------- request bodies


class ProjectIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class LabelIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    color: Optional[str] = Field(default=None, pattern=r"^#[0-9a-fA-F]{6}$")


class FolderImportIn(BaseModel):
    folder: str
    recursive: bool = False


class MaskRef(BaseModel):
    token: str  # from an earlier decode's answer
    index: int = Field(ge=0, le=3)  # which of its candidates


class DecodeIn(BaseModel):
    points: List[Tuple[float, float]] = Field(default_factory=list, max_length=256)  # x, y in image pixels
    labels: List[int] = Field(default_factory=list, max_length=256)  # 1 positive, 0 negative
    box: Optional[Tuple[float, float, float, float]] = None  # x0, y0, x1, y1
    mask_input: Optional[MaskRef] = None  # previous low-res logits, by reference
    mask_input_b64: Optional[str] = None  # or raw: base64 of float32 little-endian (256, 256)
    multimask: bool = True  # 3 candidates, or 1


class AnnotationIn(BaseModel):
    segmentation: Dict[str, Any]  # COCO RLE {"size": [h, w], "counts": str | [int]}
    label_id: Optional[int] = None
    score: Optional[float] = None
    source: Literal["click", "box", "brush", "proposal", "import", "api"] = "api"
    meta: Dict[str, Any] = Field(default_factory=dict)  # e.g. point_coords, stability_score, crop_box


class AnnotationsIn(BaseModel):
    annotations: List[AnnotationIn] = Field(min_length=1, max_length=2000)


class AnnotationPatch(BaseModel):
    segmentation: Optional[Dict[str, Any]] = None
    label_id: Optional[int] = None
    clear_label: bool = False  # set the label to none
    version: Optional[int] = None  # the version the client edited; 409 when it changed meanwhile


class ProposalsIn(BaseModel):
    points_per_side: int = Field(default=16, ge=1, le=64)
    pred_iou_thresh: float = Field(default=0.88, ge=0, le=1)
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)
    box_nms_thresh: float = Field(default=0.7, gt=0, le=1)
    min_mask_region_area: int = Field(default=0, ge=0)
    max_proposals: int = Field(default=200, ge=1, le=2000)


# ----------------------------------------------------------------------------- helpers


def _user(x_user: Optional[str]) -> str:
    name = "".join(ch for ch in (x_user or "") if ch.isprintable()).strip()[:64]
    return name or "anonymous"


class LogitsCache:
    """Low-res logits of recent decodes, so the page can refine a mask without shipping 256x256 floats."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._items: "OrderedDict[str, Tuple[int, np.ndarray]]" = OrderedDict()
        self._lock = threading.Lock()

    def put(self, image_id: int, logits: np.ndarray) -> str:
        token = secrets.token_urlsafe(12)
        with self._lock:
            self._items[token] = (image_id, logits)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return token

    def get(self, token: str, image_id: int, index: int) -> np.ndarray:
        with self._lock:
            item = self._items.get(token)
        if item is None:
            raise ValueError("mask_input token is unknown or expired; decode again without it")
        owner, logits = item
        if owner != image_id:
            raise ValueError("mask_input token belongs to another image")
        if index >= logits.shape[0]:
            raise ValueError(f"mask_input index {index} out of range ({logits.shape[0]} candidates)")
        return logits[index]


def _mask_from_b64(text: str, size: Tuple[int, int]) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("mask_input_b64 is not valid base64") from None
    expected = size[0] * size[1] * 4
    if len(raw) != expected:
        raise ValueError(f"mask_input_b64 must hold {size[0]}x{size[1]} float32 values ({expected} bytes), got {len(raw)}")
    return np.frombuffer(raw, dtype="<f4").reshape(size).astype(np.float32)


# ----------------------------------------------------------------------------- the app


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
    storage = Storage(data_dir / "segany.db")
    segmenter = Segmenter(model)
    embeddings = EmbeddingService(segmenter, embedding_cache.cache_dir(data_dir, key), config.memory_embeddings)
    logits_cache = LogitsCache(config.logits_cache)
    import_roots = [Path(r).expanduser().resolve() for r in (config.import_roots or [data_dir])]

    def image_path(image: Dict[str, Any]) -> Path:
        return images_dir / image["stored_name"]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        embeddings.start()
        for project in storage.projects():  # finish what a previous run left
            for image in storage.images(project["id"]):
                embeddings.request(image["sha256"], image_path(image), PRIORITY_BULK)
        try:
            yield
        finally:
            embeddings.stop()
            storage.close()

    app = FastAPI(
        title="segany annotation server",
        description="Projects, images, SAM-assisted mask decoding, everything-mode proposals, annotations "
        "(COCO RLE), COCO / SA-1B export and COCO import. The browser tool is served at /.",
        version="1",
        lifespan=lifespan,
    )
    app.state.storage = storage
    app.state.embeddings = embeddings
    app.state.segmenter = segmenter
    app.state.config = config

    # ------------------------------------------------------------ errors

    def _error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status)

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

    # ------------------------------------------------------------ server, projects, labels

    @app.get("/api/info", summary="Model and limits")
    def info() -> Dict[str, Any]:
        return {
            "model": config.model_name or (Path(config.checkpoint).name if config.checkpoint else type(model).__name__),
            "model_key": key,
            "mode": config.mode,
            "max_upload_bytes": config.max_upload_bytes,
            "max_pixels": config.max_pixels,
        }

    @app.get("/api/projects", summary="List projects")
    def list_projects() -> List[Dict[str, Any]]:
        return storage.projects()

    @app.post("/api/projects", status_code=201, summary="Create a project")
    def create_project(body: ProjectIn, x_user: Optional[str] = Header(default=None)) -> Dict[str, Any]:
        name = body.name.strip()
        if not name:
            raise ValueError("project name is empty")
        return storage.create_project(name, _user(x_user))

    @app.get("/api/projects/{project_id}", summary="One project")
    def get_project(project_id: int) -> Dict[str, Any]:
        return storage.project(project_id)

    @app.get("/api/projects/{project_id}/revision", summary="Change counter (poll it to see other tabs' saves)")
    def get_revision(project_id: int) -> Dict[str, int]:
        return {"revision": storage.revision(project_id)}

    @app.get("/api/projects/{project_id}/labels", summary="The project's label set")
    def list_labels(project_id: int) -> List[Dict[str, Any]]:
        return storage.labels(project_id)

    @app.post("/api/projects/{project_id}/labels", status_code=201, summary="Add a label (or get the existing one)")
    def add_label(project_id: int, body: LabelIn) -> Dict[str, Any]:
        name = body.name.strip()
        if not name:
            raise ValueError("label name is empty")
        return storage.add_label(project_id, name, body.color)

    # ------------------------------------------------------------ images

    def _with_status(image: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(image)
        out["embedding"] = embeddings.status(image["sha256"])
        out["url"] = f"/api/images/{image['id']}/file"
        return out

    @app.get("/api/projects/{project_id}/images", summary="Images with their embedding status and progress")
    def list_images(project_id: int) -> Dict[str, Any]:
        items = [_with_status(i) for i in storage.images(project_id)]
        ready = sum(1 for i in items if i["embedding"] == "ready")
        return {
            "images": items,
            "progress": {"ready": ready, "total": len(items), "seconds_per_image": embeddings.seconds_per_image},
            "revision": storage.revision(project_id),
        }

    def _add_image_bytes(project_id: int, name: str, data: bytes, user: str) -> Tuple[Dict[str, Any], bool]:
        checked = check_image_bytes(data, config.max_upload_bytes, config.max_pixels)
        stored = store(checked, images_dir)
        image, created = storage.add_image(
            project_id, name, stored, checked.sha256, checked.width, checked.height, user
        )
        embeddings.request(image["sha256"], image_path(image), PRIORITY_BULK)
        return image, created

    @app.post("/api/projects/{project_id}/images", status_code=201, summary="Upload images (multipart 'files')")
    async def upload_images(
        project_id: int, files: List[UploadFile] = File(...), x_user: Optional[str] = Header(default=None)
    ) -> Dict[str, Any]:
        storage.project(project_id)
        user = _user(x_user)
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
            stored = store(image_bytes, images_dir)
            image, created = storage.add_image(
                project_id, name, stored, image_bytes.sha256, image_bytes.width, image_bytes.height, user
            )
            embeddings.request(image["sha256"], image_path(image), PRIORITY_BULK)
            out.append({**_with_status(image), "created": created})
        return {"images": out}

    @app.post("/api/projects/{project_id}/import-folder", summary="Import the images of a server-side folder")
    def import_folder(project_id: int, body: FolderImportIn, x_user: Optional[str] = Header(default=None)):
        storage.project(project_id)
        folder = resolve_import_folder(body.folder, import_roots)
        paths, skipped = folder_images(folder, body.recursive)
        added, existing, rejected = [], [], [{"file": n, "reason": "not an image file name"} for n in skipped]
        for path in paths:
            try:
                if path.stat().st_size > config.max_upload_bytes:
                    raise ImageRejected(f"larger than {config.max_upload_bytes} bytes", 413)
                rel = str(path.relative_to(folder))
                image, created = _add_image_bytes(project_id, rel, path.read_bytes(), _user(x_user))
            except ImageRejected as exc:
                rejected.append({"file": str(path.relative_to(folder)), "reason": str(exc)})
                continue
            (added if created else existing).append(image["id"])
        return {"added": added, "existing": existing, "rejected": rejected}

    @app.get("/api/images/{image_id}", summary="One image")
    def get_image(image_id: int) -> Dict[str, Any]:
        return _with_status(storage.image(image_id))

    @app.get("/api/images/{image_id}/file", summary="The image file", response_class=FileResponse)
    def image_file(image_id: int):
        image = storage.image(image_id)
        return FileResponse(image_path(image), headers={"Cache-Control": "private, max-age=31536000, immutable"})

    @app.get("/api/images/{image_id}/embedding", summary="Embedding status")
    def embedding_status(image_id: int) -> Dict[str, Any]:
        image = storage.image(image_id)
        return {"status": embeddings.status(image["sha256"]), "error": embeddings.error(image["sha256"])}

    @app.post("/api/images/{image_id}/embedding", summary="Compute this image's embedding next")
    def prioritise_embedding(image_id: int) -> Dict[str, Any]:
        image = storage.image(image_id)
        return {"status": embeddings.request(image["sha256"], image_path(image), PRIORITY_OPEN)}

    # ------------------------------------------------------------ decode and proposals

    @app.post("/api/images/{image_id}/decode", summary="Masks for points / box / previous logits")
    def decode(image_id: int, body: DecodeIn) -> Dict[str, Any]:
        t0 = time.perf_counter()
        image = storage.image(image_id)
        size = (image["height"], image["width"])
        coords = labels = None
        if body.points or body.labels:
            coords, labels = check_points(np.array(body.points, dtype=np.float64).reshape(-1, 2), body.labels, size)
        box = check_boxes(body.box, size) if body.box is not None else None
        mask = None
        if body.mask_input is not None and body.mask_input_b64 is not None:
            raise ValueError("give mask_input or mask_input_b64, not both")
        if body.mask_input is not None:
            mask = logits_cache.get(body.mask_input.token, image_id, body.mask_input.index)
        elif body.mask_input_b64 is not None:
            mask = _mask_from_b64(body.mask_input_b64, segmenter.low_res_size)
        if coords is None and box is None and mask is None:
            raise ValueError("give at least one point, a box or a mask_input")
        t1 = time.perf_counter()
        embedding = embeddings.get(image["sha256"], image_path(image), config.decode_wait_s)
        t2 = time.perf_counter()
        pred = segmenter.segment(
            embedding, Prompt(points=coords, labels=labels, box=box, mask=mask), multimask_output=body.multimask
        )
        token = logits_cache.put(image_id, pred.low_res_logits.astype(np.float32))
        candidates = []
        for i in range(pred.masks.shape[0]):
            encoded = masks.encode(pred.masks[i])
            candidates.append(
                {
                    "index": i,
                    "score": float(pred.scores[i]),
                    "segmentation": {"size": [size[0], size[1]], "counts": encoded["counts"]},
                    "area": encoded["area"],
                    "bbox": encoded["bbox"],
                }
            )
        t3 = time.perf_counter()
        return {
            "candidates": candidates,
            "best": int(np.argmax(pred.scores)),
            "token": token,
            "timing_ms": {
                "wait_embedding": round((t2 - t1) * 1000, 2),
                "decode": round((t3 - t2) * 1000, 2),
                "total": round((t3 - t0) * 1000, 2),
            },
        }

    @app.post("/api/images/{image_id}/proposals", summary="Everything-mode proposals for an image")
    def proposals(image_id: int, body: ProposalsIn) -> Dict[str, Any]:
        from .proposals import generate_proposals

        image = storage.image(image_id)
        embedding = embeddings.get(image["sha256"], image_path(image), config.decode_wait_s)
        t0 = time.perf_counter()
        records = generate_proposals(segmenter, embedding, image_path(image), body.model_dump())
        records = sorted(records, key=lambda r: -r["predicted_iou"])[: body.max_proposals]
        return {"proposals": records, "seconds": round(time.perf_counter() - t0, 3)}

    # ------------------------------------------------------------ annotations

    def _checked_item(image: Dict[str, Any], item: AnnotationIn) -> Dict[str, Any]:
        encoded = masks.from_client(item.segmentation, image["height"], image["width"])
        meta = item.meta or {}
        if len(json.dumps(meta)) > 20000:
            raise ValueError("annotation meta is too large")
        return {
            "label_id": item.label_id,
            "rle_counts": encoded["counts"],
            "area": encoded["area"],
            "bbox": encoded["bbox"],
            "score": item.score,
            "source": item.source,
            "meta": meta,
        }

    @app.get("/api/images/{image_id}/annotations", summary="An image's annotations")
    def list_annotations(image_id: int) -> Dict[str, Any]:
        image = storage.image(image_id)
        return {"annotations": storage.annotations(image_id), "revision": storage.revision(image["project_id"])}

    @app.post("/api/images/{image_id}/annotations", status_code=201, summary="Save annotations (committed on return)")
    def create_annotations(
        image_id: int, body: AnnotationsIn, x_user: Optional[str] = Header(default=None)
    ) -> Dict[str, Any]:
        image = storage.image(image_id)
        items = [_checked_item(image, a) for a in body.annotations]
        return {"annotations": storage.add_annotations(image_id, items, _user(x_user))}

    @app.patch("/api/annotations/{annotation_id}", summary="Change an annotation's label or mask")
    def update_annotation(
        annotation_id: int, body: AnnotationPatch, x_user: Optional[str] = Header(default=None)
    ) -> Dict[str, Any]:
        current = storage.annotation(annotation_id)
        changes: Dict[str, Any] = {}
        if body.segmentation is not None:
            image = storage.image(current["image_id"])
            encoded = masks.from_client(body.segmentation, image["height"], image["width"])
            changes.update(rle_counts=encoded["counts"], area=encoded["area"], bbox=encoded["bbox"])
        if body.clear_label:
            changes["label_id"] = None
        elif body.label_id is not None:
            changes["label_id"] = body.label_id
        return storage.update_annotation(annotation_id, changes, _user(x_user), body.version)

    @app.delete("/api/annotations/{annotation_id}", summary="Delete an annotation")
    def delete_annotation(annotation_id: int) -> Dict[str, Any]:
        return {"deleted": storage.delete_annotation(annotation_id)["id"]}

    # ------------------------------------------------------------ export and import

    @app.get("/api/projects/{project_id}/export/coco", summary="COCO instances JSON of the project")
    def export_coco(project_id: int) -> Response:
        project = storage.project(project_id)
        data = exports.coco_instances(project, storage.images(project_id), storage.labels(project_id),
                                      storage.project_annotations(project_id))
        name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in project["name"]) or "project"
        return Response(
            json.dumps(data),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{name}_coco.json"'},
        )

    @app.get("/api/images/{image_id}/export/sa1b", summary="SA-1B style per-image JSON")
    def export_sa1b(image_id: int) -> Dict[str, Any]:
        image = storage.image(image_id)
        return exports.sa1b_image(image, storage.annotations(image_id))

    @app.post("/api/projects/{project_id}/import/coco", summary="Import COCO annotations for images already in the project")
    async def import_coco(
        project_id: int, file: UploadFile = File(...), x_user: Optional[str] = Header(default=None)
    ) -> Dict[str, Any]:
        storage.project(project_id)
        raw = await file.read(config.max_request_bytes + 1)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a JSON file: {exc}") from None
        return exports.import_coco(storage, project_id, data, _user(x_user))

    # ------------------------------------------------------------ the page

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
