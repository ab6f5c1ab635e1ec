"""Odd training photos are normalised, not rejected (personalize.images)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.errors import BadInputError
from personalize.images import list_images, load_images, load_masks

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)


def to_unit(rgb):
    """An 8-bit colour as the [-1, 1] values load_images should give."""
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0


def assert_colour(pixels: torch.Tensor, rgb, atol=0.02):
    """Every pixel of ``pixels`` (3, ...) is ``rgb``."""
    expected = to_unit(rgb).view(3, *([1] * (pixels.dim() - 1))).expand_as(pixels)
    assert torch.allclose(pixels, expected, atol=atol), (pixels.reshape(3, -1).mean(1), expected.reshape(3, -1)[:, 0])


def halves(mode, size, left, right, vertical=False):
    """An image whose left (or top) half is ``left`` and the other half ``right``."""
    w, h = size
    img = Image.new(mode, size, left)
    box = (0, h // 2, w, h) if vertical else (w // 2, 0, w, h)
    img.paste(Image.new(mode, (box[2] - box[0], box[3] - box[1]), right), box[:2])
    return img


def load_one(path, size):
    x = load_images([path], size)
    assert x.shape == (1, 3, size, size)
    assert x.dtype == torch.float32
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    return x[0]


# --------------------------------------------------------------------------- plain RGB: the reference
def test_plain_rgb_maps_to_minus_one_plus_one(tmp_path):
    img = halves("RGB", (16, 16), RED, (0, 128, 255))
    img.save(tmp_path / "a.png")
    x = load_one(tmp_path / "a.png", 16)
    assert_colour(x[:, :, :8], RED, atol=1e-6)
    assert_colour(x[:, :, 8:], (0, 128, 255), atol=1e-6)


def test_several_images_stack_in_order(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "r.png")
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "b.png")
    x = load_images([tmp_path / "b.png", tmp_path / "r.png"], 8)
    assert x.shape == (2, 3, 8, 8)
    assert_colour(x[0], BLUE, atol=1e-6)
    assert_colour(x[1], RED, atol=1e-6)


# --------------------------------------------------------------------------- transparency
def test_rgba_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent *black*
    img.paste(Image.new("RGBA", (8, 16), (255, 0, 0, 255)), (8, 0))  # opaque red right half
    img.paste(Image.new("RGBA", (8, 4), (255, 0, 0, 128)), (0, 12))  # half-transparent red strip
    img.save(tmp_path / "rgba.png")
    x = load_one(tmp_path / "rgba.png", 16)
    assert_colour(x[:, :12, :8], (255, 255, 255), atol=1e-6)  # transparent -> white, not black
    assert x[:, :12, :8].min() > 0.99
    assert_colour(x[:, :, 8:], RED, atol=1e-6)  # opaque pixels unchanged
    # 50 % red over white = (255, 127, 127)
    assert_colour(x[:, 12:, :8], (255, 127, 127), atol=0.02)


def test_la_transparent_pixels_become_white(tmp_path):
    img = Image.new("LA", (16, 16), (0, 0))
    img.paste(Image.new("LA", (8, 16), (40, 255)), (8, 0))
    img.save(tmp_path / "la.png")
    x = load_one(tmp_path / "la.png", 16)
    assert_colour(x[:, :, :8], (255, 255, 255), atol=1e-6)
    assert_colour(x[:, :, 8:], (40, 40, 40), atol=1e-6)


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency_becomes_white(tmp_path, ext):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)  # index 0 black (transparent), 1 red
    img.paste(1, (8, 0, 16, 16))
    path = tmp_path / f"pal.{ext}"
    img.save(path, transparency=0)
    with Image.open(path) as check:  # the file really is a palette image with a transparent index
        assert check.mode == "P" and "transparency" in check.info
    x = load_one(path, 16)
    assert_colour(x[:, :, :8], (255, 255, 255), atol=1e-6)
    assert_colour(x[:, :, 8:], RED, atol=1e-6)


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.paste(1, (8, 0, 16, 16))
    img.save(tmp_path / "pal.png")
    x = load_one(tmp_path / "pal.png", 16)
    assert_colour(x[:, :, :8], (0, 0, 0), atol=1e-6)
    assert_colour(x[:, :, 8:], BLUE, atol=1e-6)


# --------------------------------------------------------------------------- colour modes
def test_grayscale_gives_three_equal_channels(tmp_path):
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 16x16, values 0..240 by column
    Image.fromarray(ramp, mode="L").save(tmp_path / "gray.png")
    x = load_one(tmp_path / "gray.png", 16)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    expected = torch.from_numpy(ramp.astype(np.float32)) / 127.5 - 1.0
    assert torch.allclose(x[0], expected, atol=1e-6)


def test_cmyk_becomes_sensible_rgb(tmp_path):
    img = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    img.paste(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (8, 0))  # magenta + yellow: red
    img.paste(Image.new("CMYK", (8, 8), (255, 255, 0, 0)), (0, 8))  # cyan + magenta: blue
    img.paste(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), (8, 8))  # black ink: black
    img.save(tmp_path / "cmyk.tif")
    with Image.open(tmp_path / "cmyk.tif") as check:
        assert check.mode == "CMYK"
    x = load_one(tmp_path / "cmyk.tif", 16)
    assert_colour(x[:, :8, :8], (255, 255, 255))
    assert_colour(x[:, :8, 8:], RED)
    assert_colour(x[:, 8:, :8], BLUE)
    assert_colour(x[:, 8:, 8:], (0, 0, 0))


def test_cmyk_jpeg_is_read(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    x = load_one(tmp_path / "cmyk.jpg", 16)
    assert_colour(x, RED, atol=0.1)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([0, 16384, 32768, 65535], dtype=np.uint16)
    arr = np.repeat(np.repeat(values[None, :], 16, axis=0), 4, axis=1)  # 16x16, four column bands
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    img.save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode in ("I;16", "I;16B", "I;16L", "I")  # what a 16-bit PNG decodes to
    x = load_one(tmp_path / "deep.png", 16)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    bands = [x[0, :, 4 * k : 4 * k + 4].mean().item() for k in range(4)]
    # 0 -> black, full scale -> white, and the grey levels in between stay in between
    assert bands[0] == pytest.approx(-1.0, abs=0.01)
    assert bands[1] == pytest.approx(-0.5, abs=0.02)
    assert bands[2] == pytest.approx(0.0, abs=0.02)
    assert bands[3] == pytest.approx(1.0, abs=0.01)


def test_16_bit_image_object_in_memory(tmp_path):
    """'I;16' straight from Pillow (saved as TIFF, which keeps the mode)."""
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[:, :4] = 0
    Image.fromarray(arr).save(tmp_path / "deep.tif")
    x = load_one(tmp_path / "deep.tif", 8)
    assert_colour(x[:, :, :4], (0, 0, 0), atol=1e-6)
    assert_colour(x[:, :, 4:], (255, 255, 255), atol=1e-6)


# --------------------------------------------------------------------------- geometry
def _exif_jpeg(path, orientation):
    """A 40x20 JPEG whose stored pixels are red on the left half and blue on the right."""
    img = halves("RGB", (40, 20), RED, BLUE)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == orientation
    return path


def _is(pixels, rgb):
    return torch.allclose(pixels.mean(dim=(1, 2)), to_unit(rgb), atol=0.15)


def test_exif_orientation_1_is_left_as_stored(tmp_path):
    x = load_one(_exif_jpeg(tmp_path / "o1.jpg", 1), 20)
    # centre crop of the 40x20 stored image: red left, blue right
    assert _is(x[:, :, 1:8], RED) and _is(x[:, :, 12:19], BLUE)


@pytest.mark.parametrize(
    "orientation, top, bottom, left, right",
    [
        # 6: the camera was turned clockwise; displaying rotates 90 deg clockwise, the stored left edge goes on top
        (6, RED, BLUE, None, None),
        # 8: rotate 90 deg counter-clockwise to display, the stored left edge goes to the bottom
        (8, BLUE, RED, None, None),
        # 3: rotate 180 deg, left and right swap
        (3, None, None, BLUE, RED),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom, left, right):
    x = load_one(_exif_jpeg(tmp_path / f"o{orientation}.jpg", orientation), 20)
    if top is not None:
        # displayed image is 20 wide x 40 tall; the centre square is half one colour on top, half the other below
        assert _is(x[:, 1:8, :], top), x.mean(dim=(1, 2))
        assert _is(x[:, 12:19, :], bottom)
        # and nothing varies from left to right any more
        assert torch.allclose(x[:, :, :8].mean(dim=2), x[:, :, 12:].mean(dim=2), atol=0.1)
    else:
        assert _is(x[:, :, 1:8], left) and _is(x[:, :, 12:19], right)


def test_exif_rotated_png(tmp_path):
    img = halves("RGB", (40, 20), RED, BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "o6.png", exif=exif.tobytes())
    x = load_one(tmp_path / "o6.png", 20)
    assert_colour(x[:, 0:9, :], RED, atol=1e-6)
    assert_colour(x[:, 11:, :], BLUE, atol=1e-6)


@pytest.mark.parametrize("wide", [True, False])
def test_non_square_is_centre_cropped(tmp_path, wide):
    # three bands of 20: green | red | blue (across if wide, down if tall); the centre square is the red band
    size = (60, 20) if wide else (20, 60)
    img = Image.new("RGB", size, GREEN)
    img.paste(Image.new("RGB", (20, 20), RED), (20, 0) if wide else (0, 20))
    img.paste(Image.new("RGB", (20, 20), BLUE), (40, 0) if wide else (0, 40))
    img.save(tmp_path / "strip.png")
    x = load_one(tmp_path / "strip.png", 20)
    assert_colour(x, RED, atol=1e-6)
    small = load_one(tmp_path / "strip.png", 10)  # crop then resize
    assert_colour(small[:, 1:-1, 1:-1], RED, atol=0.02)


def test_off_centre_content_is_cropped_away(tmp_path):
    img = Image.new("RGB", (48, 16), RED)
    img.paste(Image.new("RGB", (8, 16), BLUE), (0, 0))  # blue only at the far left
    img.save(tmp_path / "wide.png")
    x = load_one(tmp_path / "wide.png", 16)
    assert_colour(x, RED, atol=1e-6)


def test_tiny_image_is_upscaled(tmp_path):
    img = halves("RGB", (4, 4), RED, BLUE)
    img.save(tmp_path / "tiny.png")
    x = load_one(tmp_path / "tiny.png", 32)
    assert _is(x[:, :, :12], RED) and _is(x[:, :, 20:], BLUE)
    assert torch.allclose(x[:, 0], x[:, 31], atol=1e-6)  # rows identical: nothing varies top to bottom


def test_larger_image_is_downscaled(tmp_path):
    halves("RGB", (100, 100), RED, BLUE).save(tmp_path / "big.png")
    x = load_one(tmp_path / "big.png", 10)
    assert_colour(x[:, :, :4], RED, atol=0.02)
    assert_colour(x[:, :, 6:], BLUE, atol=0.02)


# --------------------------------------------------------------------------- listing the folder
def test_list_images_ignores_non_images_and_sorts(tmp_path):
    names = ["photo_b.png", "photo_a.jpg", "Photo_c.JPEG", "d.webp", "e.bmp", "f.tif"]
    for name in names:
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF"}.get(
            "." + name.rsplit(".", 1)[1].lower(), "PNG")
        Image.new("RGB", (8, 8), RED).save(tmp_path / name, format=fmt)
    (tmp_path / "notes.txt").write_text("shot on my phone")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "._photo_a.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README").write_text("photos of my teddy")
    got = list_images(tmp_path)
    assert got == sorted(tmp_path / n for n in names)
    assert all(p.parent == tmp_path for p in got)
    # and they all load
    assert load_images(got, 8).shape == (len(names), 3, 8, 8)


def test_list_images_sorted_regardless_of_creation_order(tmp_path):
    for name in ["c.png", "a.png", "b.png"]:
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png", "c.png"]
    assert list_images(str(tmp_path)) == list_images(tmp_path)


def test_list_images_errors_name_the_folder(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BadInputError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(BadInputError, match="not a folder"):
        list_images(tmp_path / "notes.txt")


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(BadInputError, match="broken.jpg") as info:
        load_images([tmp_path / "broken.jpg"], 8)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- masks
def _mask(path, values):
    Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L").save(path)


def test_masks_match_images_by_stem_and_are_normalised(tmp_path):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    for name in ["a.jpg", "b.jpg"]:
        Image.new("RGB", (8, 8), RED).save(photos / name)
    a = np.zeros((8, 8), np.uint8)
    a[:, 4:] = 128  # max 128: must be scaled to 1.0
    a[:, 6:] = 64
    b = np.full((8, 8), 200, np.uint8)
    b[:4] = 0
    _mask(masks / "a.png", a)
    _mask(masks / "b.png", b)
    (masks / "notes.txt").write_text("masks from SAM")
    images = [photos / "b.jpg", photos / "a.jpg"]  # order of the images, not of the folder
    m = load_masks(masks, images, 8)
    assert m.shape == (2, 1, 8, 8)
    assert m.dtype == torch.float32
    # b: top half 0, bottom half 1
    assert torch.allclose(m[0, 0, :4], torch.zeros(4, 8))
    assert torch.allclose(m[0, 0, 4:], torch.ones(4, 8))
    # a: 0 | 1 | 0.5 by columns (normalised by its own max, 128)
    assert torch.allclose(m[1, 0, :, :4], torch.zeros(8, 4))
    assert torch.allclose(m[1, 0, :, 4:6], torch.ones(8, 2))
    assert torch.allclose(m[1, 0, :, 6:], torch.full((8, 2), 0.5))
    assert m.max() == 1.0 and m.min() == 0.0


def test_masks_are_cropped_like_the_images(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    wide = np.zeros((8, 24), np.uint8)
    wide[:, 8:16] = 255  # only the centre square is foreground
    _mask(masks / "p.png", wide)
    m = load_masks(masks, [tmp_path / "p.jpg"], 8)
    assert torch.allclose(m[0, 0], torch.ones(8, 8))


def test_rgb_mask_becomes_one_channel(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(masks / "p.png")
    m = load_masks(masks, [tmp_path / "p.png"], 4)
    assert m.shape == (1, 1, 4, 4)
    assert torch.allclose(m, torch.ones_like(m))


def test_missing_mask_names_the_image(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    _mask(masks / "a.png", np.full((4, 4), 255))
    with pytest.raises(BadInputError) as info:
        load_masks(masks, [tmp_path / "a.jpg", tmp_path / "holiday_07.jpg"], 4)
    message = str(info.value)
    assert "holiday_07.jpg" in message
    assert "holiday_07.png" in message or "--masks" in message  # says how to fix it
    assert "\n" not in message


def test_missing_mask_folder(tmp_path):
    with pytest.raises(BadInputError, match="mask folder"):
        load_masks(tmp_path / "nope", [tmp_path / "a.jpg"], 4)


# --------------------------------------------------------------------------- scoring reads images as training does
def _odd_pngs(tmp_path):
    """A 16-bit grayscale PNG, an EXIF-rotated PNG and an RGBA PNG with transparent pixels, all asymmetric."""
    deep = np.zeros((24, 32), dtype=np.uint16)
    deep[:, 8:16], deep[:, 16:24], deep[:, 24:] = 16384, 40000, 65535
    Image.fromarray(deep).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    halves("RGB", (40, 20), RED, BLUE).save(tmp_path / "rotated.png", exif=exif.tobytes())
    rgba = halves("RGBA", (32, 16), (0, 0, 255, 0), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 255, 0, 128))
    rgba.save(tmp_path / "alpha.png")
    return [tmp_path / "deep.png", tmp_path / "rotated.png", tmp_path / "alpha.png"]


def test_scoring_reads_odd_pngs_the_way_training_does(tmp_path):
    """CLIP/DINO scoring (load_image, the decode workers), the toy world's measurer and the report's thumbnails
    see the same upright, 8-bit, white-composited RGB pixels as training's open_rgb / load_images."""
    import base64
    import io

    from PIL import ImageOps

    from personalize.benchmark.report.grid import _thumbnail
    from personalize.datasets.toyworld.measure import _as_array
    from personalize.evaluation.decode import preprocessed_batches
    from personalize.evaluation.models import load_image
    from personalize.images import open_rgb

    paths = _odd_pngs(tmp_path)
    for path in paths:
        train = open_rgb(path)
        expected = np.asarray(train)
        assert train.mode == "RGB" and expected.dtype == np.uint8
        assert np.array_equal(np.asarray(load_image(path)), expected)
        (decoded,) = next(iter(preprocessed_batches([path], [lambda im: torch.from_numpy(np.asarray(im).copy())])))
        assert np.array_equal(decoded[0].numpy(), expected)
        assert np.array_equal(_as_array(path), _as_array(train))
        uri, _ = _thumbnail(path)
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
            assert thumb.convert("RGB").resize(train.size, Image.Resampling.NEAREST).tobytes() == train.tobytes()
        x = load_images([path], 16)[0]  # training's tensors: the same picture, centre-cropped and resized
        square = np.asarray(ImageOps.fit(train, (16, 16), method=Image.Resampling.BICUBIC), dtype=np.float32)
        assert torch.allclose(x, torch.from_numpy(square).permute(2, 0, 1) / 127.5 - 1, atol=1e-5)
    deep, rotated, alpha = (np.asarray(open_rgb(p)) for p in paths)
    assert deep[0, :, 0].tolist() == [0] * 8 + [63] * 8 + [155] * 8 + [255] * 8  # scaled from 16 bits, not clipped
    assert rotated.shape == (40, 20, 3) and rotated[0, 0].tolist() == list(RED)  # upright: stored left on top
    assert alpha[5, 5].tolist() == [255, 255, 255] and alpha[5, 20].tolist() == list(RED)  # transparent -> white
