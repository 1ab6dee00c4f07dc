"""The split between the model definition (segany.modeling) and the inference engine (segany.engine):
the definition holds no speed paths and imports nothing above it, the plain modules reproduce the
released outputs themselves, and the engine agrees with them."""
from __future__ import annotations

import ast
import copy
import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import segany
from segany.engine import SamEngine
from segany.predict.transforms import ResizeLongestSide

from .conftest import REFERENCE, case_image_path, load_rgb, manifest, needs_shared

MODELING = Path(segany.__file__).parent / "modeling"

# What the definition must not test: grad mode, export/tracing, device, dtype, the native library.
FORBIDDEN = [
    r"is_grad_enabled",
    r"is_exporting",
    r"is_tracing",
    r"is_scripting",
    r"onnx",
    r"\.is_cpu\b",
    r"\.is_cuda\b",
    r"device\.type",
    r"\.dtype\s*[=!]=",
    r"bfloat16",
    r"float16",
    r"native",
    r"ctypes",
    r"inference_mode",
    r"kept_until_changed",
    r"_cache\b",
]


def _modeling_files():
    return sorted(MODELING.glob("**/*.py"))  # every family, sub-packages too


def _code_lines_matching(paths, patterns):
    """'file:line: code' for every pattern found in a line's code (comments left out)."""
    offences = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            offences += [f"{path.name}:{number}: {line.strip()}" for p in patterns if re.search(p, code)]
    return offences


def test_the_definition_tests_no_mode_device_dtype_or_native_library():
    offences = _code_lines_matching(_modeling_files(), FORBIDDEN)
    assert not offences, "\n".join(offences)
    assert not list(MODELING.glob("**/*.c")), "C sources belong to segany/engine"


def test_the_definition_imports_nothing_above_it():
    above = ("engine", "predict", "io", "cli", "server", "train", "eval")
    offences = []
    for path in _modeling_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                absolute = module.startswith("segany.") and module.split(".")[1] in above
                relative = node.level >= 2 and module.split(".")[0] in above
                if absolute or relative or (node.level >= 2 and not module):
                    offences.append(f"{path.name}: from {'.' * node.level}{module}")
            elif isinstance(node, ast.Import):
                offences += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("segany.") and a.name.split(".")[1] in above]
    assert not offences, offences


ENGINE = Path(segany.__file__).parent / "engine"

# The engine is for inference: its modules never ask whether autograd, tracing or an export is running
# (training runs the plain modules or segany.engine.training's twin, export the plain modules).
NOT_IN_THE_ENGINE = [
    r"is_grad_enabled",
    r"is_exporting",
    r"is_in_onnx_export",
    r"is_tracing",
    r"is_scripting",
    r"\.requires_grad\b(?!_)",
]


def _engine_inference_files():
    return sorted(p for p in ENGINE.glob("**/*.py") if p.name != "training.py")  # (the training twin is for autograd)


def test_the_engine_tests_no_grad_mode_or_export():
    offences = _code_lines_matching(_engine_inference_files(), NOT_IN_THE_ENGINE)
    assert not offences, "\n".join(offences)


def test_engine_entry_points_run_without_autograd(tiny_sam):
    """SamEngine's steps run outside autograd whatever the caller's grad mode: the same outputs as
    under no_grad, nothing attached to a graph."""
    torch.manual_seed(12)
    engine = SamEngine(tiny_sam, "exact")
    images = torch.randn(1, 3, 1024, 1024)
    points = (torch.rand(2, 1, 2) * 1024, torch.ones(2, 1, dtype=torch.int))
    with torch.no_grad():
        features = engine.encode(images)
        low, iou = engine.decode(features, points, None, None, True)
        full = engine.upscale(low, (1024, 1024), (700, 900))
    with torch.enable_grad():
        features_again = engine.encode(images.requires_grad_())
        low_again, iou_again = engine.decode(features_again, points, None, None, True)
        full_again = engine.upscale(low_again, (1024, 1024), (700, 900))
    for got, expected in ((features_again["image_embeddings"], features["image_embeddings"]), (low_again, low), (iou_again, iou), (full_again, full)):
        assert not got.requires_grad and got.grad_fn is None
        assert torch.equal(got, expected)


def test_the_engine_binds_its_paths_when_it_is_built(tiny_sam, monkeypatch):
    """A CPU build binds the CPU paths (oneDNN products, the compiled kernels where they loaded; in the
    fast mode the bfloat16 upscaling's kernel and its folded norm), a build without the kernels the
    PyTorch ones, any other device plain PyTorch; the choices are stored on the modules then."""
    from segany.engine import image_encoder, kernels, native, rel_pos_softmax
    from segany.engine.paths import EnginePaths, bind

    def choices(engine):
        dec, enc = engine.net.mask_decoder, engine.net.image_encoder
        return dict(
            linear=dec.transformer.layers[0].mlp.lin1.paths.linear,
            native=dec.paths.native,
            upscaling="native_upscaling" in vars(dec.output_upscaling) and dec.output_upscaling.native_upscaling,
            folded=dec.output_upscaling.in_bfloat16,
            image_update=dec.transformer.native_image_updates,
            rel_pos=_function_and_kernels(vars(enc.blocks[0].attn)["rel_pos_attention"]),
        )

    loaded = native.library() is not None
    fast = choices(SamEngine(tiny_sam, "fast"))
    assert fast == dict(
        linear=kernels.linear, native=native.library(), upscaling=loaded, folded=True, image_update=loaded,
        rel_pos=(image_encoder.rel_pos_attention_chunked, rel_pos_softmax.library()),
    )
    exact = choices(SamEngine(tiny_sam, "exact"))
    assert exact["linear"] is kernels.linear and not exact["upscaling"] and not exact["folded"] and not exact["image_update"]
    monkeypatch.setattr(native, "library", lambda: None)  # (as SEGANY_NATIVE=0)
    off = choices(SamEngine(tiny_sam, "fast"))
    assert off["native"] is None and not off["upscaling"] and off["folded"] and not off["image_update"]
    monkeypatch.setattr(rel_pos_softmax, "library", lambda: None)
    assert choices(SamEngine(tiny_sam, "fast"))["rel_pos"] == (image_encoder.rel_pos_attention_chunked, None)
    monkeypatch.undo()
    gpu = SamEngine(tiny_sam, "fast")
    bind(gpu.net, EnginePaths.build("cuda"))  # (what a CUDA build binds; nothing runs here)
    assert choices(gpu) == dict(
        linear=kernels.plain_linear, native=None, upscaling=False, folded=True, image_update=False,
        rel_pos=(image_encoder.rel_pos_attention_fused, None),
    )


def _function_and_kernels(choice):
    """(function, the compiled kernels it was bound with) of an attention module's bound choice."""
    if isinstance(choice, functools.partial):
        return choice.func, choice.keywords.get("kernels")
    return choice, None


def test_the_plain_pytorch_paths_agree_with_the_plain_modules(tiny_sam):
    """The paths a GPU build binds (plain PyTorch: whole batches, one fused attention, F.linear), run
    here on the CPU: the same outputs as the plain definition."""
    from segany.engine.paths import EnginePaths, bind

    torch.manual_seed(13)
    engine = SamEngine(tiny_sam, "exact")
    bind(engine.net, EnginePaths.plain("cpu"))
    engine.paths = EnginePaths.plain("cpu")
    images = torch.randn(1, 3, 1024, 1024)
    points = (torch.rand(4, 2, 2) * 1024, torch.ones(4, 2, dtype=torch.int))
    with torch.no_grad():
        expected = tiny_sam.encode(images)
        got = engine.encode(images)
        torch.testing.assert_close(got["image_embeddings"], expected["image_embeddings"], atol=1e-4, rtol=0)
        for multimask in (True, False):
            low, iou = engine.decode(expected, points, None, None, multimask, cache={})
            plain_low, plain_iou = tiny_sam.decode(expected, points, None, None, multimask)
            torch.testing.assert_close(low, plain_low, atol=1e-4, rtol=0)
            torch.testing.assert_close(iou, plain_iou, atol=1e-5, rtol=0)


def test_the_engine_leaves_the_model_unchanged(tiny_sam):
    model = copy.deepcopy(tiny_sam)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = SamEngine(model, "fast")
    assert next(engine.net.image_encoder.parameters()).dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The exact engine shares the model's weights: a change in place is what it reads next.
    exact = SamEngine(model, "exact")
    assert exact.net.mask_decoder.iou_token.weight is model.mask_decoder.iou_token.weight


def test_engine_decode_agrees_with_the_plain_modules(tiny_sam):
    """Every prompt path of the exact engine against the plain definition (the released math)."""
    torch.manual_seed(11)
    engine = SamEngine(tiny_sam, "exact")
    features = {"image_embeddings": torch.randn(1, 256, 64, 64)}
    cases = [
        ((torch.rand(1, 1, 2) * 1024, torch.ones(1, 1, dtype=torch.int)), None, None),
        ((torch.rand(5, 1, 2) * 1024, torch.ones(5, 1, dtype=torch.int)), None, None),
        ((torch.rand(2, 3, 2) * 1024, torch.randint(-1, 2, (2, 3))), None, None),
        (None, torch.tensor([[100.0, 200.0, 700.0, 900.0]]), None),
        ((torch.rand(1, 2, 2) * 1024, torch.ones(1, 2, dtype=torch.int)), None, torch.randn(1, 1, 256, 256) * 4),
    ]
    cache: dict = {}
    with torch.no_grad():
        for points, boxes, masks in cases:
            for multimask in (True, False):
                expected = tiny_sam.decode(features, points, boxes, masks, multimask)
                got = engine.decode(features, points, boxes, masks, multimask, cache=cache)
                torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=0)
                torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=0)


class PlainPredictor:
    """The plain modules alone (Sam.encode, decode, postprocess_masks), with the released predictor's
    transforms: what the parity tests feed a predictor."""

    def __init__(self, model: torch.nn.Module, image: np.ndarray) -> None:
        self.model = model
        self.transform = ResizeLongestSide(model.image_size)
        resized = np.array(self.transform.apply_image(image))
        x = torch.as_tensor(resized).permute(2, 0, 1)[None].float()
        self.original_size, self.input_size = image.shape[:2], resized.shape[:2]
        with torch.no_grad():
            self.features = model.encode(model.preprocess(x))

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True, return_logits=True):
        points = boxes = masks = None
        if point_coords is not None:
            coords = self.transform.apply_coords(np.asarray(point_coords, np.float64), self.original_size)
            points = (torch.as_tensor(coords, dtype=torch.float)[None], torch.as_tensor(point_labels, dtype=torch.int)[None])
        if box is not None:
            boxes = torch.as_tensor(self.transform.apply_boxes(np.asarray(box), self.original_size), dtype=torch.float).reshape(-1, 4)
        if mask_input is not None:
            masks = torch.as_tensor(mask_input, dtype=torch.float)[None]
        with torch.no_grad():
            low, iou = self.model.decode(self.features, points, boxes, masks, multimask_output)
            logits = self.model.postprocess_masks(low, self.input_size, self.original_size)
        if boxes is not None and boxes.shape[0] > 1:
            return logits.numpy(), iou.numpy(), low.numpy()
        return logits[0].numpy(), iou[0].numpy(), low[0].numpy()


def _models():
    if not (REFERENCE / "manifest.json").is_file():
        return []
    names = sorted({c["model"] for c in manifest()["cases"] if "model" in c})
    return [n if n == "sam_vit_small" else pytest.param(n, marks=pytest.mark.heavy) for n in names]


@needs_shared
@pytest.mark.parametrize("model_name", _models())
def test_plain_modules_reproduce_the_reference(model_name):
    """The definition itself, without the engine, within the fixtures' 1e-4 on every davis345_000 case."""
    from .test_reference_sam import check_case

    model = segany.load_model(REFERENCE / f"{model_name}.pth")
    image = load_rgb(case_image_path("davis345_000"))
    predictor = PlainPredictor(model, image)
    cases = [c for c in manifest()["cases"] if c.get("model") == model_name and c["image"] == "davis345_000"]
    assert cases
    for case in cases:
        check_case(predictor, case)
