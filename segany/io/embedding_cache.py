"""The annotation server's embedding cache layout, shared by the server and `segany embed`.

<data>/embeddings/<model key>/<image sha256>.safetensors: every feature tensor of the image's embedding
(SAM: "image_embeddings" (1, 256, 64, 64)) with the image size and hash as metadata. The model key is
the content hash of the checkpoint plus the numeric mode, so two checkpoints never share a cache.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Tuple, Union

PathLike = Union[str, os.PathLike]


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_key(checkpoint: PathLike, mode: str) -> str:
    """Cache key of a model: content hash of its checkpoint plus the numeric mode."""
    return f"{file_sha256(checkpoint)[:16]}-{mode}"


def cache_dir(data_dir: PathLike, key: str) -> Path:
    return Path(data_dir) / "embeddings" / key


def cache_file(directory: PathLike, sha256: str) -> Path:
    return Path(directory) / f"{sha256}.safetensors"


def encode_embedding(features: Dict[str, "object"], original_size: Tuple[int, int], sha256: str) -> bytes:
    """The cache file's bytes for an embedding's features (torch tensors) of an image of (H, W)."""
    from safetensors.torch import save as save_safetensors

    tensors = {name: value.detach().cpu().contiguous() for name, value in features.items()}
    h, w = original_size
    return save_safetensors(tensors, metadata={"height": str(h), "width": str(w), "sha256": sha256})
