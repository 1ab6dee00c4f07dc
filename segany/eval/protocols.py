"""The zero-shot protocols of the SAM paper, driven through an abstract predictor.

A `Predictor` embeds an image once (`embed`) and answers prompts on that embedding (`predict`), so
the protocols never touch a network directly: tests plug in predictors whose answers are known, and
`SeganyPredictor` runs any segany model. All protocols of one run share one embedding per image:
`evaluate_prompted` embeds each image once for all its instances, clicks and protocols.

Protocols:
- "single-point": one positive click at the object's interior point farthest from its boundary,
  multimask output; IoU of the highest-scoring mask and of the best of the masks ("oracle").
- "interactive": up to `max_clicks` clicks from the click simulator (segany.eval.clicks). The first
  click is answered with multimask output and the highest-scoring mask is kept; every later click is
  answered with one mask, given all clicks so far and the previous chosen mask's low-res logits as
  mask input. IoU after each click -> NoC@85/90, mIoU@k, the curve.
- "box": the ground-truth box as the prompt, one mask; mIoU, and mask AP with pycocotools COCOeval
  on COCO-format data (the predicted IoU is the detection score).
- "proposals": everything mode on COCO-format data; AR@10/100/1000 over IoU 0.5:0.95 (class-agnostic
  COCOeval, proposals ranked by their score).
"""
from __future__ import annotations

import abc
import contextlib
import heapq
import io
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from .clicks import Click, first_click, next_click
from .datasets import ImageSample
from .metrics import interactive_summary, iou

PROMPTED_PROTOCOLS = ("single-point", "interactive", "box")
PROTOCOLS = PROMPTED_PROTOCOLS + ("proposals",)


# ------------------------------------------------------------------ predictor interface


@dataclass
class PredictorOutput:
    masks: np.ndarray  # (C, H, W) bool
    scores: np.ndarray  # (C,) predicted quality, higher is better
    low_res_logits: Optional[np.ndarray] = None  # (C, 256, 256), fed back as mask input when present


class Predictor(abc.ABC):
    """What the protocols need from a model."""

    @abc.abstractmethod
    def embed(self, image: np.ndarray) -> Any:
        """Compute whatever is shared by all prompts on `image` (HxWx3 uint8); returns a handle."""

    @abc.abstractmethod
    def predict(self, handle: Any, points: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask: bool = True) -> PredictorOutput:
        """Masks for one prompt: points (K, 2) x, y with labels (K,), box (4,) x0 y0 x1 y1, mask_input
        (256, 256) low-res logits of an earlier answer."""


class SeganyPredictor(Predictor):
    """A segany model through segany.Segmenter."""

    def __init__(self, model: Any) -> None:
        from ..predict.segmenter import Segmenter

        self.segmenter = model if isinstance(model, Segmenter) else Segmenter(model)

    def embed(self, image: np.ndarray) -> Any:
        return self.segmenter.embed(image)

    def predict(self, handle, points=None, labels=None, box=None, mask_input=None, multimask=True):
        from ..predict.segmenter import Prompt

        prompt = Prompt(points=points, labels=labels, box=box,
                        mask=None if mask_input is None else np.asarray(mask_input)[None])
        pred = self.segmenter.segment(handle, prompt, multimask_output=multimask)
        return PredictorOutput(pred.masks, pred.scores, pred.low_res_logits)


class ProposalGenerator(abc.ABC):
    """What the proposals protocol needs: everything mode on one image."""

    @abc.abstractmethod
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Proposals as dicts with "segmentation" ((H, W) bool mask or a COCO RLE) and "score"."""


class SeganyProposalGenerator(ProposalGenerator):
    """segany's everything mode (segany.predict.amg.MaskGenerator); proposals ranked by predicted IoU.

    `settings`: an AmgSettings or a dict of its fields; the released generator's defaults otherwise.
    Masks come back as COCO RLE, so no full-size mask is kept per proposal.
    """

    def __init__(self, model: Any, settings: Any = None) -> None:
        from ..predict.amg import AmgSettings, MaskGenerator

        if settings is None:
            settings = AmgSettings()
        elif isinstance(settings, dict):
            settings = AmgSettings(**settings)
        settings.output_mode = "coco_rle"
        self.settings = settings
        self.generator = MaskGenerator(model, settings)

    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        return [{"segmentation": ann["segmentation"], "score": float(ann["predicted_iou"])}
                for ann in self.generator.generate(image)]


# ------------------------------------------------------------------ worst cases for the gallery


@dataclass(order=True)
class Case:
    """One evaluated instance kept for the worst-case gallery (thumbnails only)."""

    iou: float
    order: int
    dataset: str = field(compare=False)
    protocol: str = field(compare=False)
    image_id: Any = field(compare=False)
    image: np.ndarray = field(compare=False, repr=False)  # (h, w, 3) thumbnail
    gt: np.ndarray = field(compare=False, repr=False)  # (h, w) bool
    pred: np.ndarray = field(compare=False, repr=False)  # (h, w) bool
    clicks: List[Click] = field(compare=False, default_factory=list)  # in thumbnail pixels
    box: Optional[np.ndarray] = field(compare=False, default=None)  # in thumbnail pixels


class WorstCases:
    """Keeps the `keep` lowest-IoU cases, downscaled to at most `side` pixels."""

    def __init__(self, keep: int = 8, side: int = 320) -> None:
        self.keep, self.side = keep, side
        self._heap: List[tuple] = []  # max-heap on IoU via negation
        self._counter = itertools.count()

    def add(self, iou_value: float, dataset: str, protocol: str, image_id: Any, image: np.ndarray,
            gt: np.ndarray, pred: np.ndarray, clicks: Sequence[Click] = (), box=None) -> None:
        if self.keep <= 0:
            return
        if len(self._heap) >= self.keep and -self._heap[0][0] <= iou_value:
            return
        import cv2

        # show the object with as much context again around it, and every prompt
        h, w = gt.shape
        ys, xs = np.nonzero(gt)
        x0, x1 = (xs.min(), xs.max() + 1) if len(xs) else (0, w)
        y0, y1 = (ys.min(), ys.max() + 1) if len(ys) else (0, h)
        for c in clicks:
            x0, x1, y0, y1 = min(x0, c.x), max(x1, c.x + 1), min(y0, c.y), max(y1, c.y + 1)
        pad_x, pad_y = max(32, (x1 - x0) // 2), max(32, (y1 - y0) // 2)
        x0, y0 = max(0, x0 - pad_x), max(0, y0 - pad_y)
        x1, y1 = min(w, x1 + pad_x), min(h, y1 + pad_y)
        scale = min(1.0, self.side / max(x1 - x0, y1 - y0))
        size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))

        def small(array, interpolation=cv2.INTER_NEAREST):
            crop = np.ascontiguousarray(array[y0:y1, x0:x1])
            if crop.dtype == bool:
                return cv2.resize(crop.astype(np.uint8), size, interpolation=interpolation).astype(bool)
            return cv2.resize(crop, size, interpolation=interpolation)

        shift = np.array([x0, y0, x0, y0], dtype=np.float64)
        case = Case(iou_value, next(self._counter), dataset, protocol, image_id,
                    small(image, cv2.INTER_AREA), small(gt), small(pred),
                    [Click(round((c.x - x0) * scale), round((c.y - y0) * scale), c.positive) for c in clicks],
                    None if box is None else (np.asarray(box, dtype=np.float64) - shift) * scale)
        entry = (-iou_value, -case.order, case)
        if len(self._heap) < self.keep:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def cases(self) -> List[Case]:
        return sorted(entry[2] for entry in self._heap)


# ------------------------------------------------------------------ the prompted protocols


@dataclass
class EvalSettings:
    max_clicks: int = 20
    first_click_multimask: bool = True
    thresholds: Sequence[float] = (0.85, 0.90)


def _choose(out: PredictorOutput, shape) -> tuple:
    """The highest-scoring mask (an empty one when the predictor answered nothing) and its logits."""
    if out.masks is None or len(out.masks) == 0:
        return np.zeros(shape, dtype=bool), None, 0
    best = int(np.argmax(out.scores)) if len(out.scores) else 0
    logits = None if out.low_res_logits is None else np.asarray(out.low_res_logits[best])
    return np.asarray(out.masks[best], dtype=bool), logits, best


def _check_output(out: PredictorOutput, shape) -> None:
    if out.masks is not None and len(out.masks) and tuple(out.masks.shape[1:]) != tuple(shape):
        raise ValueError(f"the predictor returned masks of shape {out.masks.shape[1:]}, the image is {shape}")


def _first_answer(predictor: Predictor, handle: Any, click: Click, multimask: bool) -> PredictorOutput:
    return predictor.predict(handle, np.array([[click.x, click.y]], dtype=np.float64), np.array([1]),
                             multimask=multimask)


def single_point(predictor: Predictor, handle: Any, gt: np.ndarray, ignore: Optional[np.ndarray]) -> Dict:
    click = first_click(gt, ignore)
    out = _first_answer(predictor, handle, click, True)
    _check_output(out, gt.shape)
    mask, _, best = _choose(out, gt.shape)
    ious = [iou(m, gt, ignore) for m in out.masks] if len(out.masks) else [0.0]
    return {"click": [click.x, click.y], "iou_top": iou(mask, gt, ignore), "iou_oracle": max(ious),
            "chosen": best, "score": float(out.scores[best]) if len(out.scores) else 0.0,
            "_mask": mask, "_clicks": [click], "_output": out}


def interactive(predictor: Predictor, handle: Any, gt: np.ndarray, ignore: Optional[np.ndarray],
                max_clicks: int, first_multimask: bool = True,
                first_output: Optional[PredictorOutput] = None) -> Dict:
    """`first_output`: the answer to the first click when already known (the single-point protocol
    asks the same question with multimask output), so it is not computed twice."""
    click = first_click(gt, ignore)
    clicks = [click]
    out = first_output if first_output is not None else _first_answer(predictor, handle, click, first_multimask)
    _check_output(out, gt.shape)
    mask, logits, _ = _choose(out, gt.shape)
    ious = [iou(mask, gt, ignore)]
    while len(ious) < max_clicks:
        click = next_click(gt, mask, ignore)
        if click is None:  # nothing left to correct: the answer stays as it is
            ious += [ious[-1]] * (max_clicks - len(ious))
            break
        clicks.append(click)
        points = np.array([[c.x, c.y] for c in clicks], dtype=np.float64)
        labels = np.array([c.label for c in clicks])
        out = predictor.predict(handle, points, labels, mask_input=logits, multimask=False)
        _check_output(out, gt.shape)
        mask, logits, _ = _choose(out, gt.shape)
        ious.append(iou(mask, gt, ignore))
    return {"ious": ious, "clicks": [[c.x, c.y, c.label] for c in clicks], "_mask": mask, "_clicks": clicks}


def box_prompt(predictor: Predictor, handle: Any, gt: np.ndarray, ignore: Optional[np.ndarray],
               box: np.ndarray) -> Dict:
    out = predictor.predict(handle, box=np.asarray(box, dtype=np.float64), multimask=False)
    _check_output(out, gt.shape)
    mask, _, best = _choose(out, gt.shape)
    return {"box": [float(v) for v in box], "iou": iou(mask, gt, ignore),
            "score": float(out.scores[best]) if len(out.scores) else 0.0, "_mask": mask}


def evaluate_prompted(predictor: Predictor, samples: Iterable[ImageSample], protocols: Sequence[str],
                      dataset_name: str, settings: EvalSettings = EvalSettings(),
                      coco: Any = None, worst: Optional[Dict[str, WorstCases]] = None,
                      on_image: Optional[Callable[[ImageSample], None]] = None,
                      done: Optional[Dict[str, Dict[str, List[Dict]]]] = None,
                      on_records: Optional[Callable[[Any, Dict[str, List[Dict]]], None]] = None) -> Dict[str, Dict]:
    """Run the prompted protocols over a dataset, one embedding per image. Returns per-protocol results
    with "summary" and "records" (one per instance).

    Resuming: `done` maps str(image_id) to the records an earlier run produced for that image; those
    images are not evaluated again. `on_records(image_id, records)` receives each new image's records
    (to store them). With `coco`, box records carry the predicted mask as RLE, so mask AP can be
    computed from records alone.
    """
    unknown = [p for p in protocols if p not in PROMPTED_PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown prompted protocol(s) {unknown}; choose from {', '.join(PROMPTED_PROTOCOLS)}")
    if settings.max_clicks < 1:
        raise ValueError("max_clicks must be at least 1")
    records: Dict[str, List[Dict]] = {p: [] for p in protocols}
    image_ids: List[Any] = []
    worst = worst if worst is not None else {}
    done = done or {}
    for sample in samples:
        image_ids.append(sample.image_id)
        stored = done.get(str(sample.image_id))
        if stored is not None:
            for protocol in protocols:
                records[protocol].extend(stored.get(protocol, []))
        else:
            found = _evaluate_image(predictor, sample, protocols, dataset_name, settings, coco is not None, worst)
            for protocol in protocols:
                records[protocol].extend(found[protocol])
            if on_records:
                on_records(sample.image_id, found)
        if on_image:
            on_image(sample)
    results: Dict[str, Dict] = {}
    for protocol in protocols:
        recs = records[protocol]
        if protocol == "single-point":
            summary = {"instances": len(recs),
                       "mIoU": _mean([r["iou_top"] for r in recs]),
                       "mIoU_oracle": _mean([r["iou_oracle"] for r in recs])}
        elif protocol == "interactive":
            summary = interactive_summary([r["ious"] for r in recs], settings.max_clicks, settings.thresholds)
        else:
            summary = {"instances": len(recs), "mIoU": _mean([r["iou"] for r in recs])}
            if coco is not None:
                detections = [{"image_id": r["image_id"], "category_id": r["category_id"],
                               "segmentation": r["segmentation"], "score": r["score"]} for r in recs]
                summary.update(mask_ap(coco, detections, image_ids))
        results[protocol] = {"summary": summary, "records": recs}
    return results


def _evaluate_image(predictor: Predictor, sample: ImageSample, protocols: Sequence[str], dataset_name: str,
                    settings: EvalSettings, keep_masks: bool, worst: Dict[str, WorstCases]) -> Dict[str, List[Dict]]:
    """All protocols on all instances of one image, on one embedding."""
    found: Dict[str, List[Dict]] = {p: [] for p in protocols}
    if not sample.instances:
        return found
    handle = predictor.embed(sample.image)
    for index, inst in enumerate(sample.instances):
        if first_click(inst.mask, inst.ignore) is None:
            continue  # no object pixel outside the ignored ones: nothing to click, nothing to score
        base = {"image_id": sample.image_id, "instance": index}
        if inst.annotation_id is not None:
            base["annotation_id"] = inst.annotation_id
        shared = None
        if "single-point" in protocols:
            r = single_point(predictor, handle, inst.mask, inst.ignore)
            _keep(worst, "single-point", r["iou_top"], dataset_name, sample, inst, r)
            found["single-point"].append({**base, **_public(r)})
            shared = r["_output"] if settings.first_click_multimask else None
        if "interactive" in protocols:
            r = interactive(predictor, handle, inst.mask, inst.ignore, settings.max_clicks,
                            settings.first_click_multimask, shared)
            _keep(worst, "interactive", r["ious"][-1], dataset_name, sample, inst, r)
            found["interactive"].append({**base, **_public(r)})
        if "box" in protocols:
            box = sample.boxes[index] if sample.boxes is not None else inst.box
            r = box_prompt(predictor, handle, inst.mask, inst.ignore, box)
            _keep(worst, "box", r["iou"], dataset_name, sample, inst, r, box=box)
            extra = {"category_id": inst.category_id, "segmentation": encode_mask(r["_mask"])} if keep_masks else {}
            found["box"].append({**base, **_public(r), **extra})
    return found


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _public(record: Dict) -> Dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _keep(worst, protocol, value, dataset_name, sample, inst, record, box=None) -> None:
    collector = worst.get(protocol)
    if collector is not None:
        collector.add(value, dataset_name, protocol, sample.image_id, sample.image, inst.mask,
                      record["_mask"], record.get("_clicks", ()), box)


# ------------------------------------------------------------------ COCO evaluation


def encode_mask(mask: np.ndarray) -> Dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _cocoeval(coco_gt, detections: List[Dict], image_ids: Sequence[Any], use_cats: bool,
              max_dets: Sequence[int]):
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.params.useCats = int(use_cats)
        evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def mask_ap(coco_gt, detections: List[Dict], image_ids: Sequence[Any]) -> Dict[str, float]:
    """COCO mask AP (segm) of `detections` on the images evaluated."""
    names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"]
    if not detections:
        return {name: 0.0 for name in names}
    stats = _cocoeval(coco_gt, detections, image_ids, use_cats=True, max_dets=(1, 10, 100))
    return {name: float(stats[i]) for i, name in enumerate(names)}


def evaluate_proposals(generator: ProposalGenerator, samples: Iterable[ImageSample], coco_gt,
                       max_proposals: int = 1000,
                       on_image: Optional[Callable[[ImageSample], None]] = None,
                       done: Optional[Dict[str, Dict[str, List[Dict]]]] = None,
                       on_records: Optional[Callable[[Any, Dict[str, List[Dict]]], None]] = None) -> Dict[str, Dict]:
    """Class-agnostic average recall of everything-mode proposals at 10/100/1000 proposals per image.
    `done` / `on_records` resume as in evaluate_prompted (records: {"proposals": [detections]})."""
    detections: List[Dict] = []
    image_ids: List[Any] = []
    counts: List[int] = []
    done = done or {}
    for sample in samples:
        image_ids.append(sample.image_id)
        stored = done.get(str(sample.image_id))
        if stored is not None:
            found = stored.get("proposals", [])
        else:
            proposals = sorted(generator.generate(sample.image), key=lambda p: -float(p["score"]))[:max_proposals]
            found = []
            for p in proposals:
                seg = p["segmentation"]
                if not isinstance(seg, dict):
                    seg = encode_mask(seg)
                found.append({"image_id": sample.image_id, "category_id": 1, "segmentation": seg,
                              "score": float(p["score"])})
            if on_records:
                on_records(sample.image_id, {"proposals": found})
        detections.extend(found)
        counts.append(len(found))
        if on_image:
            on_image(sample)
    summary: Dict[str, Any] = {"images": len(image_ids),
                               "mean_proposals": float(np.mean(counts)) if counts else 0.0}
    if detections:
        stats = _cocoeval(coco_gt, detections, image_ids, use_cats=False, max_dets=(10, 100, 1000))
        summary.update({"AR@10": float(stats[6]), "AR@100": float(stats[7]), "AR@1000": float(stats[8]),
                        "AR_small@1000": float(stats[9]), "AR_medium@1000": float(stats[10]),
                        "AR_large@1000": float(stats[11])})
    else:
        summary.update({"AR@10": 0.0, "AR@100": 0.0, "AR@1000": 0.0})
    return {"proposals": {"summary": summary, "records": [
        {"image_id": i, "proposals": n} for i, n in zip(image_ids, counts)]}}
