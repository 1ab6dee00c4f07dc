"""What every route shares: the server's context (config, storage, model, caches) and the request's user.

The context is built once by create_app and kept in app.state.ctx; routes get it with the `Ctx`
dependency, so that each router module is a plain set of functions over it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Tuple

from fastapi import Depends, Header, Request

from ..predict import Segmenter
from .embeddings import PRIORITY_BULK, EmbeddingService
from .images import check_image_bytes, store
from .jobs import Jobs
from .logits import LogitsCache
from .storage import Storage


@dataclass
class ServerContext:
    config: Any  # ServerConfig
    model: Any
    model_key: str
    images_dir: Path
    import_roots: List[Path]
    storage: Storage
    segmenter: Segmenter
    embeddings: EmbeddingService
    logits_cache: LogitsCache
    jobs: Jobs
    fastsam_proposals: Any = None  # FastSamProposals when the server proposes with FastSAM
    models: Any = None  # ModelSet: the default model and the others the page may pick (models.py)

    def slot(self, name: Optional[str] = None) -> Any:
        """The ModelSlot a request names (None: the default); UnknownModel (422) otherwise."""
        return self.models.get(name)

    def image_path(self, image: Dict[str, Any]) -> Path:
        return self.images_dir / image["stored_name"]

    def with_status(self, image: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(image)
        out["embedding"] = self.embeddings.status(image["sha256"])
        out["url"] = f"/api/images/{image['id']}/file"
        return out

    def add_image_bytes(self, project_id: int, name: str, data: bytes, user: str) -> Tuple[Dict[str, Any], bool]:
        checked = check_image_bytes(data, self.config.max_upload_bytes, self.config.max_pixels)
        stored = store(checked, self.images_dir)
        image, created = self.storage.add_image(
            project_id, name, stored, checked.sha256, checked.width, checked.height, user
        )
        self.embeddings.request(image["sha256"], self.image_path(image), PRIORITY_BULK)
        return image, created


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx


def current_user(x_user: Optional[str] = Header(default=None)) -> str:
    """The X-User header as a display name (printable, at most 64 characters); 'anonymous' without it."""
    name = "".join(ch for ch in (x_user or "") if ch.isprintable()).strip()[:64]
    return name or "anonymous"


Ctx = Annotated[ServerContext, Depends(get_context)]
User = Annotated[str, Depends(current_user)]
