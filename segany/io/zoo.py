"""The model zoo: known released checkpoints, and a downloader that fetches them into a cache.

    load_model("vit_b")  ->  $SEGANY_HOME/checkpoints/sam_vit_b_01ec64.pth (downloaded once)

The download resumes a partial file with an HTTP Range request, shows a progress bar, checks the
size and SHA-256 where they are published, and only then renames the file into place, so that the
cache never holds a truncated or corrupted checkpoint under its final name.

Environment:
  SEGANY_HOME             cache root (default: the user cache directory, e.g. ~/.cache/segany)
  SEGANY_MODEL_BASE_URL   a mirror serving the files by their file names; replaces the official URLs
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from .models import NAME_RESOLVERS

PathLike = Union[str, os.PathLike]
CHUNK = 1 << 20


class DownloadError(ValueError):
    """A checkpoint could not be fetched (no network, HTTP error, interrupted transfer)."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its published size or SHA-256."""


class UnverifiedDownloadWarning(UserWarning):
    """The file was downloaded but no published SHA-256 is known to check it against."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    filename: str
    url: str
    family: str
    licence: str
    size: Optional[int] = None  # bytes, where verified
    sha256: Optional[str] = None  # where verified; None: the download is reported as unverified
    aliases: Tuple[str, ...] = ()
    description: str = ""


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_HQ = "https://huggingface.co/lkeab/hq-sam/resolve/main/"
_ULTRALYTICS = "https://github.com/ultralytics/assets/releases/download/v8.4.0/"
_SSAM = "https://github.com/UX-Decoder/Semantic-SAM/releases/download/checkpoint/"
_CLIP = "https://openaipublic.azureedge.net/clip/models/"

# Sources: the READMEs of facebookresearch/segment-anything (SAM links, Apache-2.0),
# ChaoningZhang/MobileSAM (weights/mobile_sam.pt in the repository) and SysCV/sam-hq (the
# Hugging Face repository lkeab/hq-sam; sam_hq_vit_tiny.pth linked directly). Sizes and SHA-256
# are recorded only where verified; HQ-SAM's are not published, so its downloads are unverified.
KNOWN_MODELS = (
    ModelEntry(
        "vit_b", "sam_vit_b_01ec64.pth", _SAM + "sam_vit_b_01ec64.pth", "SAM", "Apache-2.0",
        375042383, "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        description="SAM ViT-B (91M-parameter encoder)",
    ),
    ModelEntry(
        "vit_l", "sam_vit_l_0b3195.pth", _SAM + "sam_vit_l_0b3195.pth", "SAM", "Apache-2.0",
        1249524607, "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        description="SAM ViT-L",
    ),
    ModelEntry(
        "vit_h", "sam_vit_h_4b8939.pth", _SAM + "sam_vit_h_4b8939.pth", "SAM", "Apache-2.0",
        2564550879, "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        aliases=("default",), description="SAM ViT-H (the default of the release)",
    ),
    ModelEntry(
        "vit_t", "mobile_sam.pt", "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "MobileSAM", "Apache-2.0",
        40728226, "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        aliases=("mobile_sam",), description="MobileSAM: TinyViT encoder, fast on a CPU",
    ),
    ModelEntry("hq_vit_b", "sam_hq_vit_b.pth", _HQ + "sam_hq_vit_b.pth", "HQ-SAM", "Apache-2.0",
               description="HQ-SAM on SAM ViT-B"),
    ModelEntry("hq_vit_l", "sam_hq_vit_l.pth", _HQ + "sam_hq_vit_l.pth", "HQ-SAM", "Apache-2.0",
               description="HQ-SAM on SAM ViT-L"),
    ModelEntry("hq_vit_h", "sam_hq_vit_h.pth", _HQ + "sam_hq_vit_h.pth", "HQ-SAM", "Apache-2.0",
               description="HQ-SAM on SAM ViT-H"),
    # FastSAM (CASIA-IVA-Lab/FastSAM, Apache-2.0): the released files as ultralytics' downloader fetches
    # them (its assets release v8.4.0); no SHA-256 is published, so these downloads are unverified.
    ModelEntry("fastsam-s", "FastSAM-s.pt", _ULTRALYTICS + "FastSAM-s.pt", "FastSAM", "Apache-2.0",
               aliases=("fastsam_s",), description="FastSAM-s: YOLOv8s-seg proposals, prompt-guided selection"),
    ModelEntry("fastsam-x", "FastSAM-x.pt", _ULTRALYTICS + "FastSAM-x.pt", "FastSAM", "Apache-2.0",
               aliases=("fastsam_x", "fastsam"), description="FastSAM-x: YOLOv8x-seg proposals"),
    # OpenAI's CLIP (text prompts): the URLs of openai/CLIP's clip.py (also in open_clip's pretrained.py);
    # the folder in each path is the file's full SHA-256, which OpenAI's own loader checks.
    ModelEntry("clip_vit_b32", "ViT-B-32.pt", _CLIP + "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
               "CLIP", "MIT", sha256="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
               aliases=("ViT-B-32", "ViT-B/32"), description="OpenAI CLIP ViT-B/32 (text prompts)"),
    ModelEntry("clip_vit_b16", "ViT-B-16.pt", _CLIP + "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
               "CLIP", "MIT", sha256="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
               aliases=("ViT-B-16", "ViT-B/16"), description="OpenAI CLIP ViT-B/16 (text prompts)"),
    ModelEntry("clip_vit_l14", "ViT-L-14.pt", _CLIP + "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
               "CLIP", "MIT", sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
               aliases=("ViT-L-14", "ViT-L/14"), description="OpenAI CLIP ViT-L/14 (text prompts)"),
    ModelEntry("hq_vit_tiny", "sam_hq_vit_tiny.pth", _HQ + "sam_hq_vit_tiny.pth", "HQ-SAM", "Apache-2.0",
               aliases=("light_hq_sam",), description="Light HQ-SAM on MobileSAM's TinyViT"),
    # Semantic-SAM: the links of the README of UX-Decoder/Semantic-SAM (commit e11f8b5); no size or
    # SHA-256 is published, so these downloads are unverified. Licence: Apache-2.0 per its pyproject.toml.
    ModelEntry("semantic-sam-t", "swint_only_sam_many2many.pth", _SSAM + "swint_only_sam_many2many.pth",
               "Semantic-SAM", "Apache-2.0", aliases=("semantic_sam_t",),
               description="Semantic-SAM Swin-T (SA-1B, many-to-many): six granularities per click"),
    ModelEntry("semantic-sam-l", "swinl_only_sam_many2many.pth", _SSAM + "swinl_only_sam_many2many.pth",
               "Semantic-SAM", "Apache-2.0", aliases=("semantic_sam_l",),
               description="Semantic-SAM Swin-L (SA-1B, many-to-many): six granularities per click"),
)

REGISTRY: Dict[str, ModelEntry] = {entry.name: entry for entry in KNOWN_MODELS}


def register(entry: ModelEntry) -> ModelEntry:
    """Add (or replace) a checkpoint, e.g. a fine-tuned model on your own server."""
    REGISTRY[entry.name] = entry
    return entry


def find_entry(name: str) -> Optional[ModelEntry]:
    """The entry named `name` (or with that alias or file name), or None."""
    if name in REGISTRY:
        return REGISTRY[name]
    for entry in REGISTRY.values():
        if name in entry.aliases or name == entry.filename:
            return entry
    return None


def get_entry(name: str) -> ModelEntry:
    entry = find_entry(name)
    if entry is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)} (see `segany models`)")
    return entry


def cache_dir() -> Path:
    """Where checkpoints are kept: $SEGANY_HOME/checkpoints, else the user cache directory."""
    home = os.environ.get("SEGANY_HOME")
    if home:
        return Path(home).expanduser() / "checkpoints"
    import platformdirs

    return Path(platformdirs.user_cache_dir("segany")) / "checkpoints"


def entry_url(entry: ModelEntry, base_url: Optional[str] = None) -> str:
    """The official URL, or `<base_url>/<file name>` for a mirror (argument or $SEGANY_MODEL_BASE_URL)."""
    base = base_url or os.environ.get("SEGANY_MODEL_BASE_URL")
    return f"{base.rstrip('/')}/{entry.filename}" if base else entry.url


def cached_path(entry: ModelEntry, cache: Optional[PathLike] = None) -> Path:
    return (Path(cache) if cache is not None else cache_dir()) / entry.filename


def is_cached(entry: ModelEntry, cache: Optional[PathLike] = None) -> bool:
    path = cached_path(entry, cache)
    return path.is_file() and (entry.size is None or path.stat().st_size == entry.size)


def human_size(size: Optional[int]) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


class _Interrupted(Exception):
    """The transfer stopped part-way; what arrived is kept for a resume."""


def download(
    model: Union[str, ModelEntry],
    *,
    cache: Optional[PathLike] = None,
    base_url: Optional[str] = None,
    progress: bool = True,
    retries: int = 2,
    timeout: float = 60.0,
) -> Path:
    """Fetch a known checkpoint into the cache (if it is not there yet) and return its path.

    An interrupted transfer is resumed up to `retries` times within the call, and by a later call
    otherwise (the partial file `<name>.part` stays in the cache).
    """
    entry = model if isinstance(model, ModelEntry) else get_entry(model)
    dest = cached_path(entry, cache)
    if is_cached(entry, cache):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = entry_url(entry, base_url)
    partial = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch(entry, url, partial, dest, progress, timeout)
            break
        except _Interrupted as exc:
            if attempt >= retries:
                raise DownloadError(
                    f"download of {url} was interrupted ({exc}); {partial.stat().st_size if partial.exists() else 0} "
                    f"bytes are kept in {partial}: run the same command again to resume"
                ) from None
            attempt += 1
    _verify(entry, url, partial)
    with open(partial, "rb+") as handle:  # make the bytes durable before the rename publishes them
        os.fsync(handle.fileno())
    os.replace(partial, dest)
    return dest


def _offline_message(entry: ModelEntry, url: str, dest: Path, reason: object) -> str:
    return (
        f"could not download {entry.name} from {url} ({reason}). Without network access, fetch "
        f"{entry.filename} elsewhere and pass the file instead: load_model('/path/to/{entry.filename}') "
        f"or --checkpoint /path/to/{entry.filename} (or copy it to {dest})"
    )


def _fetch(entry: ModelEntry, url: str, partial: Path, dest: Path, progress: bool, timeout: float) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "segany"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Nothing left to send: the partial file is complete (checked next) or longer than the
            # file; in that case start again from scratch.
            if entry.size is None or have == entry.size:
                return
            partial.unlink()
            raise _Interrupted(f"the partial file ({have} bytes) does not fit the server's file") from None
        raise DownloadError(f"could not download {entry.name}: HTTP {exc.code} {exc.reason} for {url}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(_offline_message(entry, url, dest, reason)) from None

    with response:
        resumed = have > 0 and response.status == 206 and _range_start(response) == have
        if not resumed:
            have = 0  # the server sent the whole file (it ignored or refused the range)
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else entry.size
        from tqdm.auto import tqdm

        with open(partial, "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=entry.filename, disable=not progress, leave=False,
        ) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as exc:
                    raise _Interrupted(f"{type(exc).__name__}: {exc}") from None
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
    got = partial.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"the connection closed after {got} of {total} bytes")


def _range_start(response) -> Optional[int]:
    content_range = response.headers.get("Content-Range", "")  # "bytes 100-199/200"
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def sha256_of(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(entry: ModelEntry, url: str, partial: Path) -> None:
    """Size and SHA-256 against the published values; a mismatch deletes the partial file."""
    size = partial.stat().st_size
    if entry.size is not None and size != entry.size:
        partial.unlink()
        raise ChecksumError(
            f"{entry.filename} from {url} has {size} bytes, expected {entry.size}; "
            f"deleted the partial download {partial}: run again to download it afresh"
        )
    digest = sha256_of(partial)
    if entry.sha256 is None:
        warnings.warn(
            f"could not verify {entry.filename}: no published SHA-256 is known for it "
            f"(the downloaded file's is {digest})",
            UnverifiedDownloadWarning,
            stacklevel=3,
        )
    elif digest != entry.sha256.lower():
        partial.unlink()
        raise ChecksumError(
            f"checksum mismatch for {entry.filename} from {url}: expected SHA-256 {entry.sha256}, got {digest}; "
            f"deleted the partial download {partial}: run again to download it afresh"
        )


def resolve_name(name: str) -> Optional[Path]:
    """NAME_RESOLVERS hook: a known model name gives its cached file, downloading it if needed."""
    entry = find_entry(name)
    return download(entry) if entry is not None else None


if resolve_name not in NAME_RESOLVERS:
    NAME_RESOLVERS.append(resolve_name)
