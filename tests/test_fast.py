"""Speed paths: the exact-mode rewrites equal the plain formulas; the fast (bfloat16) mode agrees with exact."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segany
from segany.engine import image_encoder as ie
from segany.engine.mask_decoder import conv_transpose_2x2
from segany.engine.paths import rebind

from .conftest import REFERENCE, case_image_path, load_rgb, manifest, needs_shared

REL_L2_MAX = 0.03
IOU_MIN = 0.97
CONFIDENT = 0.05


def attention_case(q_size, bh, c):
    """Random q, k, v and rel-pos tables, and attention with the materialised bias written out."""
    torch.manual_seed(1)
    n = q_size[0] * q_size[1]
    q, k, v = (torch.randn(bh, n, c) for _ in range(3))
    rel_h = torch.randn(2 * q_size[0] - 1, c)
    rel_w = torch.randn(2 * q_size[1] - 1, c)
    bias = ie.decomposed_rel_pos_bias(q, rel_h, rel_w, q_size, q_size)
    expected = torch.softmax(q * c**-0.5 @ k.transpose(1, 2) + bias, -1) @ v
    return q, k, v, rel_h, rel_w, expected


def check_rel_pos_attention(q, k, v, rel_h, rel_w, q_size, c, expected):
    """rel_pos_attention_chunked equals the materialised-bias attention in float32 (1e-5), and with
    bfloat16 inputs (products in bfloat16, bias and softmax in float32) within 2% relative L2."""
    got = ie.rel_pos_attention_chunked(q, k, v, rel_h, rel_w, q_size, c**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    low = ie.rel_pos_attention_chunked(*(t.bfloat16() for t in (q, k, v, rel_h, rel_w)), q_size, c**-0.5)
    assert low.dtype == torch.bfloat16
    assert ((low.float() - expected).norm() / expected.norm()).item() < 0.02


@pytest.mark.parametrize("q_size,chunk", [((14, 14), 1 << 20), ((9, 13), 117 * 117 * 4), ((16, 16), 1000)])
def test_chunked_rel_pos_attention_equals_materialised_bias(q_size, chunk, monkeypatch):
    """The windowed path (chunks of windows x heads, bias added in place, float32 softmax)."""
    c = 8
    q, k, v, rel_h, rel_w, expected = attention_case(q_size, 6, c)
    monkeypatch.setattr(ie, "WINDOW_CHUNK_ELEMENTS", chunk)
    check_rel_pos_attention(q, k, v, rel_h, rel_w, q_size, c, expected)


@pytest.mark.parametrize("q_size,band", [((16, 16), 37), ((9, 13), 117), ((12, 7), 1000)])
def test_banded_rel_pos_attention_equals_materialised_bias(q_size, band, monkeypatch):
    """The global-attention path (row bands, bias added in place) on sizes small enough to check."""
    c = 8
    q, k, v, rel_h, rel_w, expected = attention_case(q_size, 5, c)
    monkeypatch.setattr(ie, "GLOBAL_ROWS", 50)
    monkeypatch.setattr(ie, "BAND_ROWS", band)
    check_rel_pos_attention(q, k, v, rel_h, rel_w, q_size, c, expected)


def test_row_chunked_mlp_equals_whole(monkeypatch):
    from segany.engine.common import MLPBlock

    torch.manual_seed(6)
    mlp = MLPBlock(16, 40)
    x = torch.randn(2, 9, 7, 16)  # 126 rows
    expected = mlp(x)  # grad enabled: never chunked
    monkeypatch.setattr(MLPBlock, "CHUNK_ROWS", 20)
    with torch.no_grad():
        got = mlp(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=1e-6)


def test_blocked_mask_upscaling_equals_upscale_then_dot(tiny_net, monkeypatch):
    from segany.engine.mask_decoder import MaskUpscaling, mask_logits

    torch.manual_seed(7)
    up = tiny_net.mask_decoder.output_upscaling
    x = torch.randn(2, 10, 6, 256)  # B, h, w, C channels-last
    hyper = torch.randn(2, 3, 32)
    expected = mask_logits(hyper, up(x.permute(0, 3, 1, 2)))
    monkeypatch.setattr(MaskUpscaling, "ROWS_PER_BAND", 3)  # bands that do not divide h
    with torch.no_grad():
        got = up.masks(x, hyper)
    assert got.shape == (2, 3, 40, 24)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The convolutions' matrices are kept between calls, and rebuilt when the weights change in place.
    with torch.no_grad():
        up[3].weight.mul_(-0.5)
        changed = mask_logits(hyper, up(x.permute(0, 3, 1, 2)))
        torch.testing.assert_close(up.masks(x, hyper), changed, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(changed, expected, atol=1e-3)


def _rel_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


def test_bfloat16_mask_upscaling_folds_its_layer_norm(tiny_net, monkeypatch):
    """In bfloat16 the banded path folds the layer norm's centring and gain into the first convolution
    (see MaskUpscaling._folded_norm): it agrees with the float32 module on the same (bfloat16-rounded)
    weights as closely as the plain bfloat16 path does, follows changes of the norm's weights, and a
    zero gain (no 1/gain^2) falls back to the plain layer norm."""
    from segany.engine.mask_decoder import MaskUpscaling, mask_logits

    torch.manual_seed(11)
    up = copy.deepcopy(tiny_net.mask_decoder.output_upscaling).to(torch.bfloat16)
    rebind(up)  # (the engine's module chooses its paths by its weights' dtype)
    with torch.no_grad():  # a norm that is not the identity, a convolution whose outputs have a mean
        up[1].weight.copy_(1 + 0.5 * torch.randn(64))
        up[1].bias.copy_(0.3 * torch.randn(64))
        up[0].bias.add_(0.5)
    x = torch.randn(1, 10, 6, 256).to(torch.bfloat16)
    hyper = torch.randn(1, 3, 32).to(torch.bfloat16)
    monkeypatch.setattr(MaskUpscaling, "ROWS_PER_BAND", 3)

    def expected() -> torch.Tensor:
        whole = copy.deepcopy(up).float()
        return mask_logits(hyper.float(), whole(x.float().permute(0, 3, 1, 2)))

    with torch.no_grad():
        assert up._folded_norm() is not None
        folded = up.masks(x, hyper)
        assert folded.dtype == torch.float32 and folded.shape == (1, 3, 40, 24)
        assert _rel_l2(folded, expected()) < 0.01
        with monkeypatch.context() as patched:
            patched.setattr(MaskUpscaling, "_folded_norm", lambda self: None)  # the plain layer norm
            plain = up.masks(x, hyper)
        assert _rel_l2(plain, expected()) < 0.01
        assert _rel_l2(folded, plain) < 0.01

        up[1].weight.mul_(-2.0)  # in place: the folded matrix is rebuilt
        assert _rel_l2(up.masks(x, hyper), expected()) < 0.01
        up[1].weight[5] = 0.0
        assert up._folded_norm() is None
        assert _rel_l2(up.masks(x, hyper), expected()) < 0.01


@pytest.mark.parametrize("region", [(10, 6), (4, 6), (10, 1), (7, 5), (1, 1), (99, 99)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_upscaling_of_a_region_equals_that_part_of_the_whole(tiny_net, monkeypatch, region, dtype):
    """masks(region=(rows, cols)) computes the first rows x cols pixels' 4x4 blocks as a full call does
    (bands that do not divide the rows, too; the products' sums may round differently for other
    shapes), and zeros elsewhere."""
    from segany.engine.mask_decoder import MaskUpscaling

    torch.manual_seed(8)
    up = copy.deepcopy(tiny_net.mask_decoder.output_upscaling).to(dtype)
    rebind(up)  # (the engine's module chooses its paths by its weights' dtype)
    x = torch.randn(1, 10, 6, 256).to(dtype)
    hyper = torch.randn(1, 3, 32).to(dtype)
    monkeypatch.setattr(MaskUpscaling, "ROWS_PER_BAND", 3)
    with torch.no_grad():
        whole = up.masks(x, hyper)
        part = up.masks(x, hyper, region=region)
    rows, cols = 4 * min(region[0], 10), 4 * min(region[1], 6)
    assert part.shape == whole.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(part[..., :rows, :cols], whole[..., :rows, :cols], atol=tol, rtol=tol)
    assert not part[..., rows:, :].any() and not part[..., :, cols:].any()


def test_engine_encoder_takes_no_other_path_under_autograd(tiny_sam):
    """The engine is for inference: its modules choose no other path when autograd is on (training
    runs the plain modules, see segany.engine.training for the decoder's training twin); their
    products written into buffers refuse autograd loudly."""
    torch.manual_seed(2)
    from segany.engine.twin import twin

    encoder = twin(copy.deepcopy(tiny_sam.image_encoder))
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        inference = encoder(x)
    with torch.enable_grad(), pytest.raises(RuntimeError, match="automatic differentiation"):
        encoder(x.requires_grad_())
    with torch.no_grad():
        plain = tiny_sam.image_encoder(x)
    torch.testing.assert_close(inference, plain, atol=1e-4, rtol=0)


def test_conv_transpose_as_matmul_equals_conv():
    torch.manual_seed(3)
    conv = torch.nn.ConvTranspose2d(16, 8, kernel_size=2, stride=2)
    x = torch.randn(3, 16, 5, 7)
    got = conv_transpose_2x2(x.permute(0, 2, 3, 1), conv).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("input_size,original_size", [((576, 1024), (480, 854)), ((1024, 301), (1700, 500)), ((3, 1024), (2, 700))])
def test_postprocess_crops_before_upsampling_without_changing_values(tiny_net, input_size, original_size):
    torch.manual_seed(4)
    low = torch.randn(2, 3, 256, 256)
    full = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
    expected = F.interpolate(full[..., : input_size[0], : input_size[1]], original_size, mode="bilinear", align_corners=False)
    got = tiny_net.postprocess_masks(low, input_size, original_size)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("resize", ["upscale_logits_opencv", "upscale_logits_native"])
@pytest.mark.parametrize(
    "input_size,original_size",
    [((576, 1024), (480, 854)), ((1024, 301), (1700, 500)), ((3, 1024), (2, 700)), ((1024, 1024), (1024, 1024)), ((768, 1024), (3024, 4032)), ((1024, 683), (1023, 682))],
)
def test_fast_resizes_agree_with_postprocess_masks(tiny_sam, resize, input_size, original_size):
    """The fast mode's resizes of the low-res logits to the image (OpenCV's two steps; the compiled
    kernel's composite of them) against the released two steps, logits and thresholded masks."""
    from segany.engine import native
    from segany.engine import resize as transforms

    if resize == "upscale_logits_native" and native.library() is None:
        pytest.skip("segany's native kernels are not available here")
    torch.manual_seed(6)
    low = torch.randn(2, 3, 256, 256) * 4
    expected = tiny_sam.postprocess_masks(low, input_size, original_size)
    got = getattr(transforms, resize)(low, input_size, original_size, 1024)
    assert got.shape == expected.shape and got.dtype == torch.float32
    # (OpenCV computes its sample positions in its own float arithmetic: ~1e-4 relative)
    torch.testing.assert_close(got, expected, atol=5e-4, rtol=1e-4 if resize == "upscale_logits_opencv" else 0)
    masks = getattr(transforms, resize)(low, input_size, original_size, 1024, threshold=0.5)
    assert masks.dtype == torch.bool and masks.shape == expected.shape
    confident = (expected - 0.5).abs() > 1e-3
    assert torch.equal(masks[confident], (expected > 0.5)[confident])


@pytest.mark.parametrize("kept_bytes", [None, 0])
def test_opencv_upscaling_work_buffers_are_per_thread(tiny_sam, monkeypatch, kept_bytes):
    """The resize's kept work buffers: calls of other sizes in turn, from two threads at once (and
    with nothing kept) give what postprocess_masks gives."""
    from concurrent.futures import ThreadPoolExecutor

    from segany.engine import resize as transforms

    if kept_bytes is not None:
        monkeypatch.setattr(transforms, "SCRATCH_KEPT_BYTES", kept_bytes)
    sizes = [((576, 1024), (480, 854)), ((1024, 301), (1700, 500)), ((1024, 1024), (640, 640))]
    torch.manual_seed(7)
    low = torch.randn(1, 3, 256, 256) * 4
    expected = {s: tiny_sam.postprocess_masks(low, *s) > 0 for s in sizes}

    def run(k):
        size = sizes[k % len(sizes)]
        got = transforms.upscale_logits_opencv(low, size[0], size[1], 1024, threshold=0.0)
        confident = tiny_sam.postprocess_masks(low, *size).abs() > 1e-3
        return bool(torch.equal(got[confident], expected[size][confident]))

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(run, range(12)))


@pytest.mark.parametrize("native_kernels", [True, False])
def test_fast_segmenter_upscales_off_the_released_path(monkeypatch, native_kernels):
    """The fast mode resizes its masks through the compiled kernel where it is available, else with
    OpenCV; either gives postprocess_masks' logits."""
    from segany.engine import native
    from segany.engine import make_fast
    from segany.engine import sam_engine as segmenter_module
    from segany.predict.segmenter import Segmenter

    from .smallsam import small_sam

    if native_kernels and native.library() is None:
        pytest.skip("segany's native kernels are not available here")
    if not native_kernels:
        monkeypatch.setattr(native, "library", lambda: None)
    model = make_fast(small_sam(1))  # 256-pixel input, 64x64 low-res logits
    seg = Segmenter(model)
    emb = seg.embedding_from_tensor(torch.randn(1, 64, 16, 16), (120, 213))
    low = torch.randn(1, 3, 64, 64)
    calls = []
    for name in ("resize_natively", "upscale_logits_opencv"):
        real = getattr(segmenter_module, name)
        monkeypatch.setattr(segmenter_module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    got = seg.upscale(low, emb)
    assert calls == (["resize_natively"] if native_kernels else ["upscale_logits_opencv"])
    assert got.shape == (1, 3, 120, 213)
    torch.testing.assert_close(got, model.postprocess_masks(low, emb.input_size, emb.original_size), atol=5e-4, rtol=0)


def test_shared_image_batch_equals_one_prompt_at_a_time(tiny_net):
    torch.manual_seed(5)
    features = {"image_embeddings": torch.randn(1, 256, 64, 64)}
    coords = torch.rand(5, 2, 2) * 1024
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [1, 0]])
    with torch.no_grad():
        low, iou = tiny_net.decode(features, (coords, labels), None, None, True)
        for i in range(5):
            low_i, iou_i = tiny_net.decode(features, (coords[i : i + 1], labels[i : i + 1]), None, None, True)
            torch.testing.assert_close(low[i : i + 1], low_i, atol=1e-4, rtol=0)
            torch.testing.assert_close(iou[i : i + 1], iou_i, atol=1e-5, rtol=0)


def test_fast_decoder_keeps_its_tokens_in_float32_and_agrees_on_every_path(tiny_sam):
    """The fast mode converts the decoder's bulk (upscaling, transformer MLPs) to bfloat16 and keeps the
    tokens' side in float32; every decoder path (one point on the shared image side, many points through
    the plain attention, a mask prompt with its own image side, a batch with and without masks) agrees
    with the exact mode within the fast mode's limits, and returns float32."""
    from segany.engine import SamEngine

    torch.manual_seed(3)
    exact = copy.deepcopy(tiny_sam)
    with torch.no_grad():  # default init leaves the logits near zero
        for name, p in exact.mask_decoder.named_parameters():
            if p.ndim > 1:
                p.mul_(2.0)
    fast = SamEngine(exact, "fast")
    dec = fast.net.mask_decoder
    assert dec.token_dtype == torch.float32 and dec.image_dtype == torch.bfloat16
    bulk = {id(p) for m in dec.bulk_modules() for p in m.parameters()}
    for name, p in dec.named_parameters():
        assert p.dtype == (torch.bfloat16 if id(p) in bulk else torch.float32), name
    features = {"image_embeddings": torch.randn(1, 256, 64, 64)}
    many = torch.rand(1, 12, 2) * 1024  # 17 tokens: the plain (SDPA) attention with projected image sides
    cases = [
        ((torch.rand(1, 1, 2) * 1024, torch.ones(1, 1, dtype=torch.int)), None, None),
        ((many, torch.randint(0, 2, (1, 12))), None, None),
        (None, torch.tensor([[100.0, 200.0, 700.0, 900.0]]), torch.randn(1, 1, 256, 256) * 4),
        ((torch.rand(3, 2, 2) * 1024, torch.randint(0, 2, (3, 2))), None, None),
        ((torch.rand(3, 2, 2) * 1024, torch.randint(0, 2, (3, 2))), None, torch.randn(3, 1, 256, 256) * 4),
    ]
    with torch.no_grad():
        for i, (points, boxes, masks) in enumerate(cases):
            for multimask in (True, False):
                low_exact, iou_exact = exact.decode(features, points, boxes, masks, multimask)
                low_fast, iou_fast = fast.decode(features, points, boxes, masks, multimask)
                assert low_fast.dtype == torch.float32 and iou_fast.dtype == torch.float32
                assert low_exact.abs().max() > 1.0, "logits near zero: the comparison would say nothing"
                rel, iou = agreement(low_exact.numpy(), low_fast.numpy())
                assert rel <= REL_L2_MAX and iou >= IOU_MIN, (i, multimask, rel, iou)
                torch.testing.assert_close(iou_fast, iou_exact, atol=0.03, rtol=0)


def test_fast_mode_converts_a_decoder_without_sides_whole():
    """A decoder that does not name its bulk (not a MaskDecoder) runs wholly in bfloat16, float32 out."""
    from segany.engine.precision import convert_twin
    from segany.engine.twin import twin

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    model = torch.nn.Module()
    model.image_encoder, model.mask_decoder = torch.nn.Linear(4, 4), Decoder()
    net = twin(model)
    convert_twin(net)
    assert net.mask_decoder.layer.weight.dtype == torch.bfloat16
    assert model.mask_decoder.layer.weight.dtype == torch.float32  # the model itself is unchanged
    with torch.no_grad():
        out = net.mask_decoder(torch.randn(2, 4))
    assert out.dtype == torch.float32


def test_fast_mode_is_listed_and_unknown_mode_is_a_value_error():
    assert "fast" in segany.io.models.MODES
    with pytest.raises(ValueError, match="unknown mode"):
        segany.load_model("whatever.pth", mode="turbo")


def agreement(exact: np.ndarray, fast: np.ndarray) -> tuple:
    """Relative L2 error of logits and IoU of the masks where the exact logits are confident."""
    rel = float(np.linalg.norm(fast - exact) / max(np.linalg.norm(exact), 1e-12))
    confident = np.abs(exact) > CONFIDENT
    a, b = (exact > 0) & confident, (fast > 0) & confident
    union = np.logical_or(a, b).sum()
    iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
    return rel, iou


def _fixture_models():
    if not (REFERENCE / "manifest.json").is_file():
        return []
    names = sorted({c["model"] for c in manifest()["cases"] if "model" in c})
    # The variants' 1024-input encoders take tens of seconds on 2 cores: heavy.
    return [n if n == "sam_vit_small" else pytest.param(n, marks=pytest.mark.heavy) for n in names]


@needs_shared
@pytest.mark.parametrize("model_name", _fixture_models())
def test_fast_mode_agrees_with_exact_on_fixtures(model_name):
    from .test_reference_sam import run_case

    path = REFERENCE / f"{model_name}.pth"
    exact = segany.load_model(path, mode="exact")
    fast = segany.load_model(path, mode="fast")
    assert fast.mode == "fast" and next(fast.image_encoder.parameters()).dtype == torch.float32
    cases = [c for c in manifest()["cases"] if c.get("model") == model_name and c["image"] == "davis345_000"]
    image = load_rgb(case_image_path("davis345_000"))
    predictors = []
    for model in (exact, fast):
        predictor = segany.SamPredictor(model)
        assert next(predictor.segmenter.engine.net.image_encoder.parameters()).dtype == (
            torch.bfloat16 if model is fast else torch.float32
        )
        predictor.set_image(image)
        predictors.append(predictor)
    emb_exact, emb_fast = (p.get_image_embedding() for p in predictors)
    assert emb_fast.dtype == torch.float32
    assert agreement(emb_exact.numpy(), emb_fast.numpy())[0] <= REL_L2_MAX
    for case in cases:
        if "mask_input_from" in case:
            continue  # the fed-back mask comes from the reference run: covered by the others
        (_, _, low_exact), (_, _, low_fast) = (run_case(p, case) for p in predictors)
        rel, iou = agreement(low_exact, low_fast)
        assert rel <= REL_L2_MAX, (case["name"], rel)
        assert iou >= IOU_MIN, (case["name"], iou)
