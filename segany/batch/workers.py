"""The per-batch work of a run, the same whether it runs in this process or as a Ray actor.

A worker is built once (it loads the model) and then called with batches of items as Ray Data gives
them: a dict of columns (id, uri, name, offset, size). It writes its outputs itself, so that only a
few numbers per image travel back: id, status (done | failed | skipped), reason, masks, seconds, and
when the worker was ready (`ready_at`, wall clock) and how long it took to load its model (`load_seconds`)
for the run's time breakdown.
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from . import sinks
from .sources import Item, decode_image, read_bytes

RESULT_COLUMNS = ("id", "status", "reason", "masks", "seconds", "ready_at", "load_seconds")


@dataclass
class ModelSpec:
    """How each worker loads the model: a checkpoint path (on every node) or a model name (downloaded there)."""

    checkpoint: str
    mode: str = "exact"  # exact | fast
    device: str = "cpu"
    threads: int = 0  # torch threads per worker; 0 leaves torch's default
    # On Ray: the model as the driver loaded it (on the CPU), put once in Ray's object store, so that
    # actors unpickle it instead of each building and loading it from the checkpoint.
    shared: Any = field(default=None, repr=False)

    def load(self):
        import torch

        from ..io.models import load_model

        if self.threads > 0:
            torch.set_num_threads(int(self.threads))
        if self.shared is not None:
            import ray

            return ray.get(self.shared).to(self.device).eval()
        return load_model(self.checkpoint, mode=self.mode, device=self.device)


@dataclass
class EverythingJob:
    model: ModelSpec
    out: str  # output folder: local path or fsspec URL
    formats: List[str]  # sa1b and/or parquet
    settings: Dict[str, Any]  # AmgSettings fields (output_mode excluded)
    model_id: str  # checkpoint SHA-256 prefix and mode, recorded with every Parquet row
    # Called with each image's id before it is processed (fault injection in tests, custom logging).
    before_image: Optional[Callable[[str], None]] = field(default=None, repr=False)


@dataclass
class EmbedJob:
    model: ModelSpec
    cache_dir: str  # <data>/embeddings/<model key>
    before_image: Optional[Callable[[str], None]] = field(default=None, repr=False)


def _items(batch: Dict[str, Any]) -> List[Item]:
    columns = {k: list(v) for k, v in batch.items()}
    return [Item.from_row({k: columns[k][i] for k in columns}) for i in range(len(columns["id"]))]


class _Loaded:
    """Times a worker's set-up: wall clock when it was ready, seconds spent loading its model."""

    def _load(self, spec: ModelSpec):
        start = time.perf_counter()
        model = spec.load()
        self.load_seconds = time.perf_counter() - start
        return model

    def _ready(self) -> None:
        self.ready_at = time.time()

    def _results(self, rows: List[Dict[str, Any]]) -> Dict[str, List[Any]]:
        for row in rows:
            row.update(ready_at=self.ready_at, load_seconds=self.load_seconds)
        return {k: [r[k] for r in rows] for k in RESULT_COLUMNS}


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def segment_document(generator, item: Item) -> Dict[str, Any]:
    """The SA-1B document of one image, exactly as the in-process `segany everything` writes it."""
    from ..io import sa1b

    image = decode_image(read_bytes(item))
    h, w = image.shape[:2]
    annotations = generator.generate_records(image).to_annotations("uncompressed_rle")
    return sa1b.sa1b_document(annotations, {"image_id": item.image_id, "width": w, "height": h, "file_name": item.name})


class EverythingWorker(_Loaded):
    def __init__(self, job: EverythingJob) -> None:
        from ..predict.amg import AmgSettings, MaskGenerator

        self.job = job
        settings = AmgSettings(**job.settings, output_mode="uncompressed_rle").validate()
        model = self._load(job.model)
        from ..modeling.yolov8_seg import YoloV8Seg

        if isinstance(model, YoloV8Seg):  # FastSAM: one network pass gives every mask, at its own defaults
            from ..predict.fastsam import FastSam

            self.generator = FastSam(model)
        else:  # SAM family; MaskGenerator takes Semantic-SAM's mask source itself
            self.generator = MaskGenerator(model, settings)
        self.settings_json = json.dumps(job.settings, sort_keys=True)
        self._ready()

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[Any]]:
        results, shard_rows = [], []
        for item in _items(batch):
            if self.job.before_image is not None:
                self.job.before_image(item.id)
            start = time.perf_counter()
            try:
                doc = segment_document(self.generator, item)
                if "sa1b" in self.job.formats:
                    sinks.write_bytes(sinks.join(self.job.out, f"{item.id}.json"), json.dumps(doc).encode())
                if "parquet" in self.job.formats:
                    shard_rows.append(sinks.parquet_row(item.id, doc, self.settings_json, self.job.model_id))
                results.append({"id": item.id, "status": "done", "reason": "", "masks": len(doc["annotations"]),
                                "seconds": time.perf_counter() - start})
            except Exception as exc:  # one bad image is an error row; the run goes on
                results.append({"id": item.id, "status": "failed", "reason": _reason(exc), "masks": 0,
                                "seconds": time.perf_counter() - start})
        if shard_rows:  # last: the shard is what marks these images as done
            sinks.write_shard(self.job.out, shard_rows)
        return self._results(results)


class EmbedWorker(_Loaded):
    """Image embeddings into the annotation server's cache, under the server's own keys."""

    def __init__(self, job: EmbedJob) -> None:
        from ..predict import Segmenter

        self.job = job
        self.segmenter = Segmenter(self._load(job.model))
        self._ready()

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[Any]]:
        from ..io.embedding_cache import cache_file, encode_embedding

        results = []
        for item in _items(batch):
            if self.job.before_image is not None:
                self.job.before_image(item.id)
            start = time.perf_counter()
            try:
                data = read_bytes(item)
                sha256 = hashlib.sha256(data).hexdigest()
                target = str(cache_file(self.job.cache_dir, sha256)) if not sinks.is_url(self.job.cache_dir) \
                    else sinks.join(self.job.cache_dir, f"{sha256}.safetensors")
                if sinks.exists(target):
                    status = "skipped"
                else:
                    embedding = self.segmenter.embed(decode_image(data))
                    sinks.write_bytes(target, encode_embedding(embedding.features, embedding.original_size, sha256))
                    status = "done"
                results.append({"id": item.id, "status": status, "reason": "", "masks": 0,
                                "seconds": time.perf_counter() - start})
            except Exception as exc:
                results.append({"id": item.id, "status": "failed", "reason": _reason(exc), "masks": 0,
                                "seconds": time.perf_counter() - start})
        return self._results(results)


class OnOneThread:
    """A worker built and called on one thread of its own: how a Ray actor runs it.

    Ray Data builds an actor's callable on the actor's main thread and calls it on another. Torch's
    OpenMP runtime (libgomp) keeps a pool of threads per calling thread, and once it manages more
    threads than there are CPUs it stops spinning at its barriers and sleeps at each one: model
    loading on one thread and segmenting on another left an actor's two torch threads waking some
    thousands of times a second (docs/scale.md). On one thread the actor runs as the in-process
    command does.
    """

    def __init__(self, worker_cls, job) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="segany-model")
        self._worker = self._thread.submit(worker_cls, job).result()

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[Any]]:
        return self._thread.submit(self._worker, batch).result()
