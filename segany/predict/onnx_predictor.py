"""A predictor on ONNX Runtime, for the graphs written by `segany export-onnx` (segany.io.onnx_export).

    predictor = OnnxPredictor("sam_decoder.onnx", encoder="sam_encoder.onnx")
    predictor.set_image(image)
    masks, scores, low_res = predictor.predict(point_coords=[[320, 200]], point_labels=[1])

It reproduces `SamPredictor.predict` for one prompt (points, a box, a mask input, or any combination)
within float32 rounding. Without an encoder graph, feed a stored embedding with set_image_embedding.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple, Union

import numpy as np

from .inputs import check_boxes, check_mask_input, check_points, load_image
from .transforms import ResizeLongestSide

PathLike = Union[str, os.PathLike]
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def _session(path: PathLike, threads: Optional[int]):
    try:
        import onnxruntime as ort
    except ImportError as err:  # an optional extra
        raise ValueError("the ONNX predictor needs onnxruntime: pip install 'segany[onnx]'") from err
    if not os.path.isfile(path):
        raise ValueError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxPredictor:
    def __init__(self, decoder: PathLike, encoder: Optional[PathLike] = None, threads: Optional[int] = None) -> None:
        self.decoder = _session(decoder, threads)
        self.encoder = _session(encoder, threads) if encoder is not None else None
        shape = self.decoder.get_inputs()[0].shape  # 1, C, h, w
        self.embedding_shape = tuple(int(d) for d in shape)
        self.image_size = 16 * self.embedding_shape[-1]
        self.low_res_size = (4 * self.embedding_shape[-2], 4 * self.embedding_shape[-1])
        self.transform = ResizeLongestSide(self.image_size)
        self.reset_image()

    def reset_image(self) -> None:
        self.features: Optional[np.ndarray] = None
        self.original_size: Optional[Tuple[int, int]] = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def preprocess(self, image: Any) -> np.ndarray:
        """HxWx3 uint8 RGB -> the normalised, padded (1, 3, S, S) encoder input."""
        resized = self.transform.apply_image(load_image(image)).astype(np.float32)
        normalised = (resized - PIXEL_MEAN) / PIXEL_STD
        h, w = normalised.shape[:2]
        padded = np.zeros((self.image_size, self.image_size, 3), dtype=np.float32)
        padded[:h, :w] = normalised
        return padded.transpose(2, 0, 1)[None].copy()

    def set_image(self, image: Any) -> None:
        if self.encoder is None:
            raise ValueError("this predictor has no encoder graph: pass encoder=... or use set_image_embedding")
        array = load_image(image)
        (embedding,) = self.encoder.run(None, {"image": self.preprocess(array)})
        self.set_image_embedding(embedding, array.shape[:2])

    def set_image_embedding(self, embedding: Any, original_size: Tuple[int, int]) -> None:
        embedding = np.asarray(embedding, dtype=np.float32)
        if embedding.ndim == 3:
            embedding = embedding[None]
        if embedding.shape != self.embedding_shape:
            raise ValueError(f"image embedding must have shape {self.embedding_shape}, got {embedding.shape}")
        h, w = int(original_size[0]), int(original_size[1])
        if h <= 0 or w <= 0:
            raise ValueError(f"original_size must be positive (H, W), got {original_size}")
        self.features, self.original_size = embedding, (h, w)

    def get_image_embedding(self) -> np.ndarray:
        if self.features is None:
            raise ValueError("no image is set: call set_image(image) or set_image_embedding(...) first")
        return self.features

    def predict(
        self,
        point_coords: Optional[Any] = None,
        point_labels: Optional[Any] = None,
        box: Optional[Any] = None,
        mask_input: Optional[Any] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt in the original image's pixels -> masks (C, H, W), scores (C,), low-res logits (C, 256, 256)."""
        features = self.get_image_embedding()
        size = self.original_size
        coords, labels = check_points(point_coords, point_labels, size)
        boxes = check_boxes(box, size)
        mask = check_mask_input(mask_input, self.low_res_size)
        if coords is None and boxes is None and mask is None:
            raise ValueError("give at least one prompt: points, box or mask_input")
        if (
            (coords is not None and coords.ndim != 2)
            or (boxes is not None and boxes.reshape(-1, 4).shape[0] != 1)
            or (mask is not None and mask.shape[0] != 1)
        ):
            raise ValueError("the ONNX predictor takes one prompt: points (K, 2), one box, one mask input")
        point_list, label_list = [], []
        if coords is not None:
            point_list.append(self.transform.apply_coords(coords, size))
            label_list.append(np.asarray(labels, dtype=np.float32))
        if boxes is not None:
            point_list.append(self.transform.apply_boxes(boxes.reshape(1, 4), size).reshape(2, 2))
            label_list.append(np.array([2.0, 3.0], dtype=np.float32))
        else:
            # No box: the padding point the model was trained with.
            point_list.append(np.zeros((1, 2), dtype=np.float32))
            label_list.append(np.array([-1.0], dtype=np.float32))
        inputs = {
            "image_embeddings": features,
            "point_coords": np.concatenate(point_list).astype(np.float32)[None],
            "point_labels": np.concatenate(label_list).astype(np.float32)[None],
            "mask_input": mask[:1] if mask is not None else np.zeros((1, 1, *self.low_res_size), np.float32),
            "has_mask_input": np.array([0.0 if mask is None else 1.0], dtype=np.float32),
            "orig_im_size": np.array(size, dtype=np.float32),
        }
        masks, scores, low_res = self.decoder.run(None, inputs)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        masks, scores, low_res = masks[0, selected], scores[0, selected], low_res[0, selected]
        if not return_logits:
            masks = masks > 0.0
        return masks, scores, low_res
