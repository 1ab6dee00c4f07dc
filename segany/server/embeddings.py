"""Image embeddings for the server: computed once in a background thread, kept on disk and in memory.

Disk cache: <data>/embeddings/<model key>/<image sha256>.safetensors holding every feature tensor of the
image (SAM: "image_embeddings" (1, 256, 64, 64)) and the image size as metadata; written atomically, so
a crash leaves either no file or a whole one. In memory: an LRU of the last few ImageEmbeddings.
The queue is a priority queue: the image a user opens (or decodes on) jumps ahead of the bulk.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Tuple

from safetensors import safe_open

from ..io.atomic import atomic_write_bytes
from ..io.embedding_cache import cache_file, encode_embedding, model_key  # noqa: F401 (model_key: the server's API)
from ..predict import ImageEmbedding, Segmenter

log = logging.getLogger("segany.server")

PRIORITY_OPEN = 0  # the image on screen
PRIORITY_BULK = 10  # everything else, in import order


class EmbeddingService:
    def __init__(self, segmenter: Segmenter, cache_dir: Path, memory_items: int = 8) -> None:
        self.segmenter = segmenter
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.memory_items = max(1, int(memory_items))
        self._memory: "OrderedDict[str, ImageEmbedding]" = OrderedDict()
        self._cond = threading.Condition()
        self._queue: list = []  # heap of (priority, seq, sha256)
        self._queued: Dict[str, Tuple[int, Path]] = {}  # sha256 -> (priority, image path)
        self._computing: Optional[str] = None
        self._errors: Dict[str, str] = {}
        self._seq = itertools.count()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.seconds_per_image: Optional[float] = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="segany-embedder", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------ status

    def path_for(self, sha256: str) -> Path:
        return cache_file(self.cache_dir, sha256)

    def status(self, sha256: str) -> str:
        """ready | computing | queued | error | missing"""
        with self._cond:
            if sha256 in self._memory:
                return "ready"
            if self._computing == sha256:
                return "computing"
            if sha256 in self._queued:
                return "queued"
            if sha256 in self._errors:
                return "error"
        return "ready" if self.path_for(sha256).is_file() else "missing"

    def error(self, sha256: str) -> Optional[str]:
        return self._errors.get(sha256)

    # ------------------------------------------------------------ requests

    def request(self, sha256: str, image_path: Path, priority: int = PRIORITY_BULK) -> str:
        """Queue an image unless its embedding exists; a lower priority number moves it forward."""
        with self._cond:
            if sha256 in self._memory or self._computing == sha256:
                return self.status(sha256)
            if self.path_for(sha256).is_file():
                return "ready"
            self._errors.pop(sha256, None)
            queued = self._queued.get(sha256)
            if queued is not None and queued[0] <= priority:
                return "queued"
            self._queued[sha256] = (priority, Path(image_path))
            heapq.heappush(self._queue, (priority, next(self._seq), sha256))
            self._cond.notify_all()
            return "queued"

    def get(self, sha256: str, image_path: Path, timeout: float = 120.0) -> ImageEmbedding:
        """The embedding, waiting for the worker (at top priority) up to `timeout` seconds."""
        cached = self._load(sha256)
        if cached is not None:
            return cached
        self.request(sha256, image_path, PRIORITY_OPEN)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if sha256 in self._memory:
                    self._memory.move_to_end(sha256)
                    return self._memory[sha256]
                if sha256 in self._errors:
                    raise RuntimeError(f"embedding failed: {self._errors[sha256]}")
                if sha256 not in self._queued and self._computing != sha256:
                    break  # written to disk and evicted from memory meanwhile: load below
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the image embedding is not ready after {timeout:g} s")
                self._cond.wait(min(left, 1.0))
        loaded = self._load(sha256)
        if loaded is None:
            raise RuntimeError("the image embedding vanished from the cache")
        return loaded

    # ------------------------------------------------------------ cache

    def _remember(self, sha256: str, embedding: ImageEmbedding) -> None:
        with self._cond:
            self._memory[sha256] = embedding
            self._memory.move_to_end(sha256)
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)

    def _load(self, sha256: str) -> Optional[ImageEmbedding]:
        with self._cond:
            if sha256 in self._memory:
                self._memory.move_to_end(sha256)
                return self._memory[sha256]
        path = self.path_for(sha256)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            original_size = (int(metadata["height"]), int(metadata["width"]))
            embedding = self.segmenter.embedding_from_tensor(tensors.pop("image_embeddings"), original_size)
        except Exception as exc:  # a damaged cache file is recomputed, not fatal
            log.warning("discarding unreadable embedding cache %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return None
        for name, value in tensors.items():
            embedding.features[name] = value.to(self.segmenter.device)
        self._remember(sha256, embedding)
        return embedding

    def _compute(self, sha256: str, image_path: Path) -> None:
        start = time.perf_counter()
        embedding = self.segmenter.embed(image_path)
        data = encode_embedding(embedding.features, embedding.original_size, sha256)
        atomic_write_bytes(self.path_for(sha256), data)
        self._remember(sha256, embedding)
        elapsed = time.perf_counter() - start
        self.seconds_per_image = elapsed if self.seconds_per_image is None else 0.7 * self.seconds_per_image + 0.3 * elapsed

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                priority, _, sha256 = heapq.heappop(self._queue)
                entry = self._queued.get(sha256)
                if entry is None or entry[0] != priority:
                    continue  # a stale heap entry (re-queued at another priority or already done)
                del self._queued[sha256]
                self._computing = sha256
                image_path = entry[1]
            try:
                if not self.path_for(sha256).is_file():
                    self._compute(sha256, image_path)
            except Exception as exc:
                log.exception("embedding %s failed", image_path)
                with self._cond:
                    self._errors[sha256] = str(exc) or type(exc).__name__
            finally:
                with self._cond:
                    self._computing = None
                    self._cond.notify_all()

