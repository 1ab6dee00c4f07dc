"""The models a server offers the page: the default one (loaded at start) and others loaded on first use.

    segany serve -c vit_b -c vit_t -c semantic-sam-t     # the first is the default

Each model has its own slot: the loaded model, its cache key, and what depends on it (a Segmenter and
an embedding service for SAM-family models, with their own embedding cache folder; the ONNX decoder
the page runs; the recent decodes' logits). A request names its model (`model` in a decode body,
`?model=` elsewhere); without one it gets the default; an unknown name is a 422 that lists the names.

Semantic-SAM (multi-granularity: one click, six levels) has no SAM embedding and no ONNX decoder: its
image features stay in memory (a few images) and its clicks decode on the server.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

log = logging.getLogger("segany.server")


class UnknownModel(ValueError):
    """A request named a model this server does not offer (answered 422)."""


def model_family(model: Any) -> str:
    """'semantic-sam' (multi-granularity) or 'sam' (SAM, MobileSAM, HQ-SAM: the prompt decoder)."""
    return "semantic-sam" if hasattr(model, "num_levels") else "sam"


class SemanticSamImages:
    """Semantic-SAM's image features for the last few images, computed on first use (one at a time)."""

    def __init__(self, model: Any, memory_items: int = 4) -> None:
        self.model = model
        self.memory_items = max(1, int(memory_items))
        self._memory: "OrderedDict[str, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self._computing: Optional[str] = None

    def status(self, sha256: str) -> str:
        if sha256 in self._memory:
            return "ready"
        return "computing" if self._computing == sha256 else "missing"

    def get(self, sha256: str, image_path: Path) -> Any:
        from ..predict.semantic_sam_predictor import embed_image

        with self._lock:
            if sha256 in self._memory:
                self._memory.move_to_end(sha256)
                return self._memory[sha256]
            self._computing = sha256
            try:
                embedded = embed_image(self.model, image_path)
            finally:
                self._computing = None
            self._memory[sha256] = embedded
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)
            return embedded

    def request(self, sha256: str, image_path: Path) -> str:
        """Compute in the background unless present (the page asks when it opens an image)."""
        if sha256 in self._memory or self._computing == sha256:
            return self.status(sha256)

        def work() -> None:
            try:
                self.get(sha256, image_path)
            except Exception:  # the decode that needs it computes it again and reports the error
                log.exception("Semantic-SAM features of %s failed", image_path)

        threading.Thread(target=work, name="segany-semantic-sam", daemon=True).start()
        return "computing"


@dataclass
class ModelSlot:
    """One model and what the server keeps per model."""

    name: str
    model: Any
    key: str  # cache key: the checkpoint's content hash and the numeric mode
    family: str
    segmenter: Any = None  # Segmenter (sam family)
    embeddings: Any = None  # EmbeddingService (sam family)
    logits_cache: Any = None  # LogitsCache (sam family)
    decoder: Any = None  # DecoderExport (sam family)
    images: Optional[SemanticSamImages] = None  # semantic-sam family

    @property
    def levels(self) -> int:
        return int(getattr(self.model, "num_levels", 0)) if self.family == "semantic-sam" else 0

    def embedding_status(self, sha256: str) -> str:
        return self.embeddings.status(sha256) if self.embeddings is not None else self.images.status(sha256)

    def embedding_error(self, sha256: str) -> Optional[str]:
        return self.embeddings.error(sha256) if self.embeddings is not None else None

    def request_embedding(self, sha256: str, image_path: Path, priority: int) -> str:
        if self.embeddings is not None:
            return self.embeddings.request(sha256, image_path, priority)
        return self.images.request(sha256, image_path)


@dataclass
class ModelSet:
    """The default slot plus the other offered models, each built by `build(name)` on first use."""

    default: ModelSlot
    others: List[str] = field(default_factory=list)  # names as given (model names or checkpoint paths)
    build: Optional[Callable[[str], ModelSlot]] = None
    _slots: Dict[str, ModelSlot] = field(default_factory=dict)
    _failed: Dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def names(self) -> List[str]:
        return [self.default.name] + [n for n in self.others if n != self.default.name]

    def loaded(self) -> List[ModelSlot]:
        return [self.default] + list(self._slots.values())

    def get(self, name: Optional[str]) -> ModelSlot:
        if name is None or name == "" or name == self.default.name:
            return self.default
        if name not in self.others:
            raise UnknownModel(f"unknown model {name[:100]!r}: this server offers {', '.join(self.names())}")
        with self._lock:  # one load at a time; concurrent requests for the same model wait for it
            if name in self._slots:
                return self._slots[name]
            if name in self._failed:
                raise UnknownModel(f"model {name!r} could not be loaded: {self._failed[name]}")
            try:
                slot = self.build(name)
            except Exception as exc:
                log.exception("loading model %s failed", name)
                self._failed[name] = str(exc) or type(exc).__name__
                raise UnknownModel(f"model {name!r} could not be loaded: {self._failed[name]}") from None
            self._slots[name] = slot
            return slot

    def describe(self) -> List[Dict[str, Any]]:
        out = []
        for name in self.names():
            slot = self.default if name == self.default.name else self._slots.get(name)
            entry: Dict[str, Any] = {"name": name, "default": name == self.default.name, "loaded": slot is not None}
            if slot is not None:
                entry.update(family=slot.family, key=slot.key, levels=slot.levels,
                             decoder="page" if slot.decoder is not None and slot.decoder.available else "server")
            elif name in self._failed:
                entry["error"] = self._failed[name]
            out.append(entry)
        return out

    def find_decoder(self, key: str) -> Any:
        """The loaded model whose exported decoder has this key, or None."""
        for slot in self.loaded():
            if slot.decoder is not None and slot.decoder.reason is None and key in slot.decoder.keys():
                return slot.decoder
        return None

    def stop(self) -> None:
        for slot in self._slots.values():
            if slot.embeddings is not None:
                slot.embeddings.stop()
