"""Text prompts: pick, among candidate masks, the ones a phrase describes, with CLIP.

    matches = select_by_text(image, masks, "a dog", clip_model, top_k=3)
    matches[0].index, matches[0].score

Any mask source plugs in: SAM's everything mode, FastSAM's instances, a list of arrays. For each mask the
image is cut to the mask's box with the pixels outside the mask blanked (a box crop alone lets a
neighbour's content inside the box decide the score), then prepared as CLIP's preprocessing does
(bicubic resize of the shortest side, centre crop, OpenAI's mean and std), encoded in batches and
compared with the text embedding by cosine similarity.

With negative phrases ("background", "a person") a mask's score is its similarity to the phrase minus its
highest similarity to a negative one, so masks that look more like a negative than the phrase rank low.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch

from ..engine.clip import CLIP_MEAN, CLIP_STD
from ..io import rle as rle_io
from .inputs import load_image

# Blanked pixels take CLIP's mean colour: after normalisation they are zeros, the most neutral input.
FILL = tuple(int(round(255 * m)) for m in CLIP_MEAN)
CROP_MODES = ("masked", "box")
MAX_PHRASE_CHARS = 300


class Scorer(Protocol):
    """What text selection needs from a model: unit-length embeddings of crops and of phrases."""

    image_size: int

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, D)
        ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:  # (M,) -> (M, D)
        ...


class ClipScorer:
    """A CLIP model (segany.modeling.clip.CLIP, exact or fast) as a Scorer."""

    def __init__(self, model: torch.nn.Module, batch_size: int = 32) -> None:
        from ..text import tokenize

        self.model = model
        self.image_size = model.image_size
        self.batch_size = batch_size
        self._tokenize = tokenize
        self._text_cache: dict = {}

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        from ..engine.clip import encode_images

        return encode_images(self.model, pixels, self.batch_size)

    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops (N, S, S, 3), not normalised -> (N, D); fast mode takes them as they are."""
        from ..engine.clip import encode_crops

        return encode_crops(self.model, crops, self.batch_size)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        from ..engine.clip import encode_texts

        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            for text, emb in zip(missing, encode_texts(self.model, self._tokenize(missing))):
                self._text_cache[text] = emb
        return torch.stack([self._text_cache[t] for t in texts])


@dataclass
class TextMatch:
    phrase: str
    index: int  # position of the mask among the candidates
    score: float  # similarity, less the best negative similarity when negatives were given
    similarity: float  # cosine similarity between the mask's crop and the phrase


def check_phrases(text: Union[str, Sequence[str]], what: str = "text") -> List[str]:
    phrases = [text] if isinstance(text, str) else list(text)
    if not phrases:
        raise ValueError(f"{what}: give at least one phrase")
    for phrase in phrases:
        if not isinstance(phrase, str):
            raise ValueError(f"{what} must be strings, got {type(phrase).__name__}")
        if not phrase.strip():
            raise ValueError(f"{what} is empty: describe the object, e.g. --text \"a dog\"")
        if len(phrase) > MAX_PHRASE_CHARS:
            raise ValueError(f"{what} is {len(phrase)} characters long; at most {MAX_PHRASE_CHARS}")
    return phrases


def as_mask_stack(masks: Any, image_shape: Tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool from an array, a list of arrays, or everything-mode records ("segmentation":
    a binary mask or an RLE)."""
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = masks[None]
    items = list(masks)
    if not items:
        return np.zeros((0, *image_shape), dtype=bool)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            seg = item.get("segmentation")
            item = rle_io.decode(seg) if isinstance(seg, dict) else seg
        if hasattr(item, "detach"):
            item = item.detach().cpu().numpy()
        array = np.asarray(item)
        if array.ndim != 2 or array.shape != tuple(image_shape):
            raise ValueError(f"mask {i} has shape {array.shape}; the image is {tuple(image_shape)}")
        out.append(array.astype(bool, copy=False))
    return np.stack(out)


def _resize_crop(crop: np.ndarray, size: int) -> np.ndarray:
    """CLIP's preprocessing up to normalisation: shortest side -> size (bicubic), centre crop size x size."""
    from PIL import Image

    h, w = crop.shape[:2]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    resized = np.asarray(Image.fromarray(crop).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[top : top + size, left : left + size]


def crop_masks(
    image: np.ndarray, masks: np.ndarray, size: int = 224, mode: str = "masked", fill: Tuple[int, int, int] = FILL
) -> torch.Tensor:
    """(N, size, size, 3) uint8, one per non-empty mask: the mask's box, outside the mask blanked
    (mode="masked") or kept (mode="box"), resized and centre-cropped as CLIP's preprocessing does but
    not normalised. The resizes (PIL, which lets go of the GIL) run on PyTorch's thread count."""
    if mode not in CROP_MODES:
        raise ValueError(f"unknown crop mode {mode!r}; choose one of {', '.join(CROP_MODES)}")
    out = np.empty((len(masks), size, size, 3), dtype=np.uint8)
    if not len(masks):
        return torch.from_numpy(out)
    rows, cols = masks.any(2), masks.any(1)  # (N, H), (N, W): the boxes of all masks in two passes

    def one(i: int) -> None:
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        crop = image[y0:y1, x0:x1]
        if mode == "masked":
            crop = np.where(masks[i, y0:y1, x0:x1, None], crop, np.asarray(fill, np.uint8))
        out[i] = _resize_crop(np.ascontiguousarray(crop), size)

    workers = max(1, min(torch.get_num_threads(), len(masks)))
    if workers == 1:
        for i in range(len(masks)):
            one(i)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(len(masks))))
    return torch.from_numpy(out)


def mask_crops(
    image: np.ndarray, masks: np.ndarray, size: int = 224, mode: str = "masked", fill: Tuple[int, int, int] = FILL
) -> torch.Tensor:
    """(N, 3, size, size) float32 CLIP inputs, one per non-empty mask: crop_masks, normalised with
    OpenAI's mean and std."""
    from ..engine.clip import normalize_crops

    return normalize_crops(crop_masks(image, masks, size, mode, fill))


def as_scorer(scorer_or_model: Any) -> Scorer:
    if scorer_or_model is None:
        raise ValueError("text prompts need a CLIP model: load one with segany.load_model('clip_vit_b32') "
                         "(or --clip NAME_OR_PATH)")
    if hasattr(scorer_or_model, "embed_images"):
        return scorer_or_model
    if hasattr(scorer_or_model, "encode_image") and hasattr(scorer_or_model, "encode_text"):
        return ClipScorer(scorer_or_model)
    raise ValueError(f"{type(scorer_or_model).__name__} is not a CLIP model; text prompts need one (e.g. clip_vit_b32)")


def score_masks(
    image: Any,
    masks: Any,
    text: Union[str, Sequence[str]],
    scorer: Any,
    negative: Optional[Sequence[str]] = None,
    crop: str = "masked",
) -> Tuple[np.ndarray, np.ndarray]:
    """(scores, similarities), each (P, N) for P phrases and N masks; empty masks get -inf."""
    image = load_image(image)
    phrases = check_phrases(text)
    negatives = check_phrases(negative, "negative phrase") if negative else []
    scorer = as_scorer(scorer)
    stack = as_mask_stack(masks, image.shape[:2])
    n = len(stack)
    sims = np.full((len(phrases), n), -np.inf, dtype=np.float32)
    scores = sims.copy()
    keep = np.flatnonzero(stack.reshape(n, -1).any(1)) if n else np.zeros(0, dtype=int)
    if keep.size == 0:
        return scores, sims
    crops = crop_masks(image, stack[keep], scorer.image_size, crop)  # (K, S, S, 3) uint8
    if hasattr(scorer, "embed_crops"):
        images = scorer.embed_crops(crops)  # (K, D)
    else:
        from ..engine.clip import normalize_crops

        images = scorer.embed_images(normalize_crops(crops))
    texts = scorer.embed_texts(phrases + negatives)  # (P + Q, D)
    all_sims = (texts @ images.T).float().numpy()  # (P + Q, K)
    sims[:, keep] = all_sims[: len(phrases)]
    scores[:, keep] = all_sims[: len(phrases)]
    if negatives:
        scores[:, keep] -= all_sims[len(phrases):].max(0, keepdims=True)
    return scores, sims


def select_by_text(
    image: Any,
    masks: Any,
    text: Union[str, Sequence[str]],
    scorer: Any,
    top_k: int = 1,
    negative: Optional[Sequence[str]] = None,
    crop: str = "masked",
) -> List[TextMatch]:
    """The top_k masks for each phrase, best first (phrase by phrase, in the order given)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    phrases = check_phrases(text)
    scores, sims = score_masks(image, masks, phrases, scorer, negative, crop)
    matches: List[TextMatch] = []
    for p, phrase in enumerate(phrases):
        order = np.argsort(-scores[p], kind="stable")
        for index in order[:top_k]:
            if np.isfinite(scores[p, index]):
                matches.append(TextMatch(phrase, int(index), float(scores[p, index]), float(sims[p, index])))
    return matches


# ---------------------------------------------------------------- text prompts in Segmenter.segment


def segment_text_prompts(segmenter, embedding, prompts, single, image, candidates, segment_others):
    """Segmenter.segment for a list holding text prompts: each text prompt's Prediction holds its top_k
    candidate masks (best first), `scores` their text scores; extras: "indices" (among the candidates),
    "similarities", "phrase". Text prompts carry no low-res logits (an empty (0, 256, 256) array):
    their masks come from the candidates, not from one decoder pass."""
    from .segmenter import Prediction

    if image is None:
        raise ValueError("text prompts need the image's pixels: segment(embedding, prompts, image=image)")
    array = load_image(image)
    if tuple(array.shape[:2]) != tuple(embedding.original_size):
        raise ValueError(f"the image is {array.shape[:2]} but the embedding was made for {embedding.original_size}")
    scorer = as_scorer(getattr(segmenter, "clip", None))
    for p in prompts:
        if p.text is not None and (p.points is not None or p.box is not None or p.mask is not None):
            raise ValueError("a text prompt cannot be combined with points, a box or a mask in one Prompt")
    if candidates is None:
        candidates = everything_masks(segmenter, embedding, array)
    stack = as_mask_stack(candidates, array.shape[:2])
    others = [i for i, p in enumerate(prompts) if p.text is None]
    results = [None] * len(prompts)
    if others:
        for i, pred in zip(others, segment_others([prompts[i] for i in others])):
            results[i] = pred
    low = segmenter.low_res_size
    for i, p in enumerate(prompts):
        if p.text is None:
            continue
        matches = select_by_text(array, stack, p.text, scorer, top_k=p.top_k, negative=p.negative)
        index = np.array([m.index for m in matches], dtype=np.int64)
        results[i] = Prediction(
            stack[index] if len(index) else np.zeros((0, *array.shape[:2]), bool),
            np.array([m.score for m in matches], dtype=np.float32),
            np.zeros((0, *low), dtype=np.float32),
            {"indices": index, "similarities": np.array([m.similarity for m in matches], np.float32), "phrase": p.text},
        )
    return results[0] if single else results


def everything_masks(segmenter, embedding, image: np.ndarray) -> np.ndarray:
    """The candidates for text prompts: everything mode's masks on the image, computed once per embedding."""
    cache = embedding.decoder_cache
    if "everything_masks" not in cache:
        from .amg import MaskGenerator

        records = MaskGenerator(segmenter.model, getattr(segmenter, "text_candidate_settings", None)).generate_records(image)
        cache["everything_masks"] = records.masks() if len(records) else np.zeros((0, *image.shape[:2]), bool)
    return cache["everything_masks"]
