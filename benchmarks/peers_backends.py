"""The backends of the peer benchmark, each run in its own process by bench_peers.py.

Every backend gets the same seeded random weights with the released key names (one state dict per model,
written once by `prepare`), the same image and the same prompts:

- `released`: the released PyTorch code, float32 (segment_anything / mobile_sam through ../shared/tools/refshim).
- `ort-fp32`, `ort-int8`: ONNX Runtime on the released code's graphs: the image encoder exported from the
  released model, and the official `SamOnnxModel` decoder (segment_anything.utils.onnx); int8 is
  onnxruntime.quantization.quantize_dynamic (QUInt8 weights) of both graphs' matrix products (MatMul, Gemm),
  as the official notebook quantizes the decoder.
- `ov-bf16`, `ov-f32`: OpenVINO on the same ONNX graphs, INFERENCE_PRECISION_HINT bf16 (its default on a CPU
  with AVX-512 BF16) and f32.
- `segany-exact`, `segany-fast`: segany.load_model on the same state dict.

The ONNX backends preprocess as the released SamPredictor does (ResizeLongestSide, normalise, pad), in the
timed encoder call, and add the padding point the released prompt encoder adds to point-only prompts.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFSHIM = SHARED / "tools" / "refshim"
IMAGE = SHARED / "datasets" / "davis345" / "images" / "000.jpg"
MODELS = ("vit_b", "vit_l", "vit_h", "vit_t", "vit_small")
# vit_small: the reference fixtures' small SAM (ViT embed 96, depth 2) with their weights, for a quick smoke run
SMALL_CHECKPOINT = SHARED / "fixtures" / "reference" / "sam_vit_small.pth"
CLICK = np.array([[400.0, 250.0]])  # (x, y) in the image's pixels


def reference_package(model: str):
    """The released package that defines `model` (benchmark only, through the refshim)."""
    if REFSHIM.is_dir() and str(REFSHIM) not in sys.path:
        sys.path.insert(0, str(REFSHIM))
    if model == "vit_t":
        import mobile_sam

        return mobile_sam
    import segment_anything

    return segment_anything


def released_module(model: str, name: str):
    """A submodule of the released package, e.g. released_module("vit_t", "utils.onnx")."""
    import importlib

    return importlib.import_module(f"{reference_package(model).__name__}.{name}")


def released_model(model: str, weights: Path | None = None):
    pkg = reference_package(model)
    if model == "vit_small":
        sam = released_module(model, "build_sam")._build_sam(96, 2, 2, [1])
    else:
        sam = pkg.sam_model_registry[model]()
    if weights is not None:
        sam.load_state_dict(torch.load(weights, map_location="cpu"))
    return sam.eval(), pkg


def load_image(path: Path | None = None) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(path or IMAGE).convert("RGB"))


def prompts64(image_shape, seed: int = 1):
    """64 one-point prompts (x, y) in the image's pixels, seeded."""
    h, w = image_shape[:2]
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, w - 1, 64), rng.uniform(0, h - 1, 64)], axis=1)[:, None, :]


# ---------------------------------------------------------------------------------------------- artifacts


def artifact_paths(workdir: Path, model: str) -> dict:
    d = Path(workdir) / model
    return {
        "weights": d / "weights.pth",
        "encoder": d / "encoder.onnx",
        "decoder": d / "decoder.onnx",
        "encoder-int8": d / "encoder.int8.onnx",
        "decoder-int8": d / "decoder.int8.onnx",
    }


def prepare(workdir: Path, model: str, seed: int = 0, onnx: bool = True, int8: bool = True) -> dict:
    """Write the seeded random weights and the released graphs (ONNX, and their int8 versions) once."""
    paths = artifact_paths(workdir, model)
    paths["weights"].parent.mkdir(parents=True, exist_ok=True)
    sam = None
    if not paths["weights"].is_file() and model == "vit_small":
        state = torch.load(SMALL_CHECKPOINT, map_location="cpu")
        torch.save({k: v.float() for k, v in state.items()}, paths["weights"])
    elif not paths["weights"].is_file():
        torch.manual_seed(seed)
        sam, _ = released_model(model)
        torch.save(sam.state_dict(), paths["weights"])
    if onnx and not (paths["encoder"].is_file() and paths["decoder"].is_file()):
        if sam is None:
            sam, _ = released_model(model, paths["weights"])
        export_released(sam, model, paths["encoder"], paths["decoder"])
    del sam
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for name in ("encoder", "decoder"):
            out = paths[f"{name}-int8"]
            if not out.is_file():
                quantize_dynamic(
                    str(paths[name]), str(out), weight_type=QuantType.QUInt8, per_channel=False, reduce_range=False,
                    # the matrix products (nearly all of the work); quantize_dynamic's ConvInteger route fails
                    # on TinyViT's graph (a convolution weight that is not an initializer)
                    op_types_to_quantize=["MatMul", "Gemm"],
                    use_external_data_format=paths["weights"].stat().st_size > 1.5e9 and name == "encoder",
                )
    return paths


def export_released(sam, model: str, encoder_path: Path, decoder_path: Path) -> None:
    """The released model's image encoder, and the official SamOnnxModel decoder as its export script does it
    (return_single_mask=False: all four masks; dynamic number of points), plus a dynamic prompt batch."""
    with torch.no_grad():
        # (a graph over 2 GB, vit_h's, is written with its weights in files beside it by the exporter)
        torch.onnx.export(
            sam.image_encoder, (torch.zeros(1, 3, 1024, 1024),), str(encoder_path),
            input_names=["image"], output_names=["image_embeddings"], opset_version=17,
            do_constant_folding=True, dynamo=False,
        )
        onnx_model = released_module(model, "utils.onnx").SamOnnxModel(sam, return_single_mask=False)
        embed_dim = sam.prompt_encoder.embed_dim
        h, w = sam.prompt_encoder.image_embedding_size
        args = (
            torch.randn(1, embed_dim, h, w),
            torch.randint(0, 1024, (1, 5, 2), dtype=torch.float),
            torch.randint(0, 4, (1, 5), dtype=torch.float),
            torch.randn(1, 1, 4 * h, 4 * w),
            torch.tensor([1], dtype=torch.float),
            torch.tensor([1500, 2250], dtype=torch.float),
        )
        names = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
        torch.onnx.export(
            onnx_model, args, str(decoder_path), input_names=names,
            output_names=["masks", "iou_predictions", "low_res_masks"],
            dynamic_axes={"point_coords": {0: "batch", 1: "num_points"}, "point_labels": {0: "batch", 1: "num_points"}},
            opset_version=17, do_constant_folding=True, dynamo=False,
        )


# ---------------------------------------------------------------------------------------------- backends


class Backend:
    """set_image / click / prompts64 / everything, as a user of each runtime would call it."""

    name = ""

    def set_image(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def embedding(self) -> np.ndarray:
        raise NotImplementedError

    def click(self):
        """One positive point, multimask: (masks at the image's size, low-res logits of the 3 multimask outputs)."""
        raise NotImplementedError

    def prompts64(self, points: np.ndarray):
        raise NotImplementedError

    def everything(self, image: np.ndarray, settings: dict | None = None) -> int:
        """Number of masks of everything mode (the released generator's settings, its defaults if none)."""
        raise NotImplementedError


class TorchBackend(Backend):
    """The released code or segany: both expose the released SamPredictor API."""

    def __init__(self, name: str, model: str, weights: Path):
        self.name = name
        if name == "released":
            sam, pkg = released_model(model, weights)
            self.predictor = pkg.SamPredictor(sam)
            self._generator = lambda settings: pkg.SamAutomaticMaskGenerator(sam, **settings)
        else:
            import segany

            sam = segany.load_model(weights, mode=name.split("-", 1)[1])
            self.predictor = segany.SamPredictor(sam)
            self._generator = lambda settings: segany.SamAutomaticMaskGenerator(sam, **settings)

    def set_image(self, image):
        with torch.inference_mode():
            self.predictor.set_image(image)

    def embedding(self):
        return self.predictor.get_image_embedding().float().numpy()

    def click(self):
        with torch.inference_mode():
            masks, _, low = self.predictor.predict(point_coords=CLICK, point_labels=np.array([1]), multimask_output=True)
        return masks, low

    def prompts64(self, points):
        p = self.predictor
        with torch.inference_mode():
            coords = torch.as_tensor(p.transform.apply_coords(points, p.original_size), dtype=torch.float)
            labels = torch.ones(coords.shape[:2], dtype=torch.int)
            return p.predict_torch(coords, labels, multimask_output=True)

    def everything(self, image, settings=None):
        with torch.inference_mode():
            return len(self._generator(settings or {}).generate(image))


class GraphBackend(Backend):
    """The released graphs in ONNX Runtime or OpenVINO."""

    def __init__(self, name: str, model: str, paths: dict, threads: int):
        self.name = name
        self.model = model
        pkg = reference_package(model)
        self.transform = released_module(model, "utils.transforms").ResizeLongestSide(1024)
        runtime, precision = name.split("-", 1)
        encoder, decoder = paths["encoder"], paths["decoder"]
        if precision == "int8":
            encoder, decoder = paths["encoder-int8"], paths["decoder-int8"]
        if runtime == "ort":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            enc = ort.InferenceSession(str(encoder), opts, providers=providers)
            dec = ort.InferenceSession(str(decoder), opts, providers=providers)
            self._encode = lambda x: enc.run(None, {"image": x})[0]
            self._decode = lambda feeds: dec.run(None, feeds)
        else:
            import openvino as ov

            core = ov.Core()
            config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
                      "PERFORMANCE_HINT": "LATENCY"}
            enc = core.compile_model(core.read_model(str(encoder)), "CPU", config)
            dec = core.compile_model(core.read_model(str(decoder)), "CPU", config)
            enc_req, dec_req = enc.create_infer_request(), dec.create_infer_request()
            self.encoder_request = enc_req

            def encode(x):
                enc_req.infer({"image": x})
                return enc_req.get_output_tensor(0).data.copy()

            def decode(feeds):
                dec_req.infer(feeds)
                return [dec_req.get_output_tensor(i).data for i in range(3)]

            self._encode, self._decode = encode, decode
        self._embedding = None
        self.original_size = None

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """As the released SamPredictor.set_image: resize the long side to 1024, normalise, pad to 1024x1024."""
        resized = self.transform.apply_image(image).astype(np.float32)
        mean = np.array([123.675, 116.28, 103.53], np.float32)
        std = np.array([58.395, 57.12, 57.375], np.float32)
        x = np.zeros((1, 3, 1024, 1024), np.float32)
        h, w = resized.shape[:2]
        x[0, :, :h, :w] = ((resized - mean) / std).transpose(2, 0, 1)
        return x

    def set_image(self, image):
        self.original_size = image.shape[:2]
        self._embedding = self._encode(self.preprocess(image))

    def embedding(self):
        return np.asarray(self._embedding, np.float32)

    def decode(self, points: np.ndarray, orig_size=None):
        """points (B, N, 2) in the image's pixels, all positive; returns masks (B, 4, H, W), iou (B, 4), low-res."""
        orig = orig_size or self.original_size
        coords = self.transform.apply_coords(points, orig).astype(np.float32)
        b = coords.shape[0]
        # the padding point (label -1) the released prompt encoder adds when there is no box
        coords = np.concatenate([coords, np.zeros((b, 1, 2), np.float32)], axis=1)
        labels = np.concatenate([np.ones((b, points.shape[1]), np.float32), -np.ones((b, 1), np.float32)], axis=1)
        feeds = {
            "image_embeddings": self._embedding,
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(orig, np.float32),
        }
        return self._decode(feeds)

    def click(self):
        masks, _, low = self.decode(CLICK[None])
        return masks[0, 1:] > 0, np.array(low[0, 1:])  # channels 1-3: the multimask outputs

    def prompts64(self, points):
        return self.decode(points)

    def everything(self, image, settings=None):
        """The released SamAutomaticMaskGenerator with this backend behind the released predictor's API."""
        from types import SimpleNamespace

        pkg = reference_package(self.model)
        # the released __init__ builds a SamPredictor on a torch model: give it a stand-in, then the proxy
        stand_in = SimpleNamespace(image_encoder=SimpleNamespace(img_size=1024))
        generator = pkg.SamAutomaticMaskGenerator(stand_in, **(settings or {}))
        generator.predictor = _PredictorProxy(self)
        return len(generator.generate(image))


class _PredictorProxy:
    """The part of the released SamPredictor the released generator uses, over a GraphBackend."""

    class _Model:
        mask_threshold = 0.0

    def __init__(self, backend: GraphBackend):
        self.backend = backend
        self.transform = backend.transform
        self.model = self._Model()
        self.device = torch.device("cpu")
        self.original_size = None

    def set_image(self, image, image_format="RGB"):
        self.backend.set_image(image)
        self.original_size = image.shape[:2]

    def reset_image(self):
        pass

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True,
                      return_logits=False):
        # the generator hands over coordinates already in the 1024 frame; the graph wants them there too
        coords = point_coords.numpy().astype(np.float32)
        b = coords.shape[0]
        coords = np.concatenate([coords, np.zeros((b, 1, 2), np.float32)], axis=1)
        labels = np.concatenate([point_labels.numpy().astype(np.float32), -np.ones((b, 1), np.float32)], axis=1)
        feeds = {
            "image_embeddings": self.backend._embedding,
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(self.original_size, np.float32),
        }
        masks, iou, low = self.backend._decode(feeds)
        sl = slice(1, 4) if multimask_output else slice(0, 1)
        masks = torch.from_numpy(np.array(masks[:, sl]))
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, torch.from_numpy(np.array(iou[:, sl])), torch.from_numpy(np.array(low[:, sl]))


def make_backend(name: str, model: str, workdir: Path, threads: int) -> Backend:
    paths = artifact_paths(workdir, model)
    if name in ("released", "segany-exact", "segany-fast"):
        return TorchBackend(name, model, paths["weights"])
    return GraphBackend(name, model, paths, threads)
