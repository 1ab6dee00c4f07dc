"""Every PIL image mode is read as a viewer shows it, or refused with one line (issue 20, finding 8)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segany.predict.inputs import load_image, pil_to_rgb


def gray8(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w), dtype=np.uint8)
    img[:5] = 0
    img[-5:] = 255
    return img


def saved(image: Image.Image, tmp_path, name: str, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_16bit_gray_png_is_its_8bit_version(tmp_path):
    g = gray8()
    p8 = saved(Image.fromarray(g), tmp_path, "g8.png")
    p16 = saved(Image.fromarray(g.astype(np.uint16) * 257), tmp_path, "g16.png")
    with Image.open(p16) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    a8, a16 = load_image(p8), load_image(p16)
    assert a16.shape == (40, 56, 3) and np.array_equal(a16, a8)
    assert a16.std() > 10  # not the solid white PIL's own convert gives


def test_16bit_gray_variants(tmp_path):
    g = gray8(seed=1)
    want = np.repeat(g[..., None], 3, axis=2)
    big_endian = Image.frombytes("I;16B", (g.shape[1], g.shape[0]), (g.astype(">u2") * 257).tobytes())
    assert np.array_equal(pil_to_rgb(big_endian), want)
    little = Image.frombytes("I;16L", (g.shape[1], g.shape[0]), (g.astype("<u2") * 257).tobytes())
    assert np.array_equal(pil_to_rgb(little), want)
    # A dark 16-bit image stays dark (scaled by the type's range, not stretched).
    dark = Image.fromarray(g.astype(np.uint16))  # values 0..255 of 65535
    assert pil_to_rgb(dark).max() <= 1


def test_float_tiff_0_to_1_is_its_8bit_version(tmp_path):
    g = gray8(seed=2)
    path = saved(Image.fromarray(g.astype(np.float32) / 255.0, mode="F"), tmp_path, "f.tif")
    with Image.open(path) as im:
        assert im.mode == "F"
    assert np.array_equal(load_image(path), np.repeat(g[..., None], 3, axis=2))


def test_float_and_32bit_outside_the_unit_range_are_stretched():
    depth = np.linspace(-50.0, 3000.0, 20 * 30, dtype=np.float32).reshape(20, 30)
    out = pil_to_rgb(Image.fromarray(depth, mode="F"))[..., 0]
    assert out.min() == 0 and out.max() == 255 and np.all(np.diff(out.ravel().astype(int)) >= 0)
    ints = Image.fromarray((np.arange(600).reshape(20, 30) * 100_000 - 5).astype(np.int32), mode="I")
    out = pil_to_rgb(ints)[..., 0]
    assert out.min() == 0 and out.max() == 255
    nan = np.full((4, 4), np.nan, np.float32)
    nan[0, 0] = 1.0
    assert pil_to_rgb(Image.fromarray(nan, mode="F"))[0, 0, 0] == 255


def test_transparency_is_shown_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque red, bottom fully transparent
    out = pil_to_rgb(Image.fromarray(rgba, "RGBA"))
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), rgba[..., 3]], axis=2), "LA")
    out = pil_to_rgb(la)
    assert tuple(out[0, 0]) == (10, 10, 10) and tuple(out[3, 3]) == (255, 255, 255)
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    out = pil_to_rgb(pal)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 255, 0)


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "RGBX", "HSV"])
def test_other_modes_convert(mode):
    out = pil_to_rgb(Image.new("RGB", (6, 5), (10, 120, 200)).convert(mode))
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8


def test_cmyk_jpeg_and_1bit_png_files(tmp_path):
    rgb = Image.new("RGB", (16, 12), (30, 160, 90))
    cmyk = load_image(saved(rgb.convert("CMYK"), tmp_path, "c.jpg"))
    assert np.abs(cmyk.astype(int) - np.array([30, 160, 90])).max() < 12
    bits = np.zeros((12, 16), bool)
    bits[:, 8:] = True
    one = load_image(saved(Image.fromarray(bits), tmp_path, "b.png"))
    assert one[0, 0].tolist() == [0, 0, 0] and one[0, 15].tolist() == [255, 255, 255]


def test_unsupported_mode_is_one_clear_line():
    with pytest.raises(ValueError, match="mode La is not supported|mode La are not supported"):
        pil_to_rgb(Image.new("La", (3, 3)))


def test_server_intake_accepts_16bit_and_refuses_unsupported_modes():
    pytest.importorskip("fastapi")
    from segany.server.images import ImageRejected, check_image_bytes

    buf = io.BytesIO()
    Image.fromarray(gray8().astype(np.uint16) * 257).save(buf, format="PNG")
    checked = check_image_bytes(buf.getvalue(), 10**7, 10**7)
    assert (checked.width, checked.height) == (56, 40)
    buf = io.BytesIO()
    Image.new("La", (4, 4)).convert("LA").save(buf, format="PNG")  # LA is fine
    check_image_bytes(buf.getvalue(), 10**7, 10**7)
    with pytest.raises(ImageRejected):
        check_image_bytes(b"\x89PNG\r\n\x1a\nnot really", 10**7, 10**7)
