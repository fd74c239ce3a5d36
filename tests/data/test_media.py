"""decode_image over every Pillow mode real data sets carry, and preprocess's three aspects."""

import io

import numpy as np
import pytest
from PIL import Image

from mm_jax.data.errors import BadRecord
from mm_jax.data.media import decode_image, preprocess

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _decode(img: Image.Image, fmt: str = "PNG", **kwargs) -> np.ndarray:
  out = decode_image(_encode(img, fmt, **kwargs), record_id="r")
  assert out.dtype == np.uint8 and out.shape == (img.height, img.width, 3)
  return out


def test_rgb_png_round_trips_exactly_from_a_path(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  path = tmp_path / "a.png"
  Image.fromarray(pixels).save(path)
  np.testing.assert_array_equal(decode_image(str(path), record_id="r"), pixels)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_white(mode):
  rgba = np.zeros((1, 3, 4), np.uint8)
  rgba[0, 0] = (0, 0, 0, 0)        # fully transparent black: the colour LLaVA would keep
  rgba[0, 1] = (0, 0, 0, 255)      # opaque black
  rgba[0, 2] = (0, 0, 0, 128)      # half transparent black over white -> mid grey
  img = Image.fromarray(rgba).convert(mode)
  out = _decode(img)
  np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(out[0, 1], (0, 0, 0))
  assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 1)


def test_grayscale_is_repeated_over_channels():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  out = _decode(Image.fromarray(gray))
  np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_palette_with_transparency():
  img = Image.new("P", (2, 1))
  img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  img.putdata([0, 1])
  img.info["transparency"] = 0
  assert Image.open(io.BytesIO(_encode(img))).mode == "P"
  np.testing.assert_array_equal(_decode(img)[0], [(255, 255, 255), (255, 0, 0)])


def test_16_bit_gradient_is_scaled_not_clipped():
  ramp = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
  img = Image.fromarray(ramp)
  assert img.mode == "I;16" and Image.open(io.BytesIO(_encode(img))).mode == "I;16"
  out = _decode(img)[:, :, 0].ravel()
  assert out[0] == 0 and out[-1] == 255
  assert np.all(np.diff(out.astype(int)) >= 0)   # monotone
  assert len(np.unique(out)) == 256              # Pillow's convert("L") leaves only 2 values
  np.testing.assert_array_equal(out, np.round(ramp.ravel() / 257.0))


def test_32_bit_int_out_of_16_bit_range_is_stretched():
  x = np.array([[-1000, 0, 99000]], np.int32)
  out = _decode(Image.fromarray(x), "TIFF")[0, :, 0]
  np.testing.assert_array_equal(out, [0, 3, 255])


def test_cmyk_and_1_bit():
  cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
  np.testing.assert_array_equal(_decode(cmyk, "TIFF")[0, 0], (255, 0, 0))
  one = Image.fromarray(np.array([[True, False]]))
  assert one.mode == "1"
  np.testing.assert_array_equal(_decode(one)[0], [(255, 255, 255), (0, 0, 0)])


def test_exif_orientation_is_applied():
  pixels = np.random.default_rng(1).integers(0, 256, (2, 3, 3), dtype=np.uint8)
  img = Image.fromarray(pixels)
  exif = img.getexif()
  exif[0x0112] = 6   # stored rotated: display it turned 90 degrees clockwise
  out = decode_image(_encode(img, exif=exif.tobytes()), record_id="r")
  np.testing.assert_array_equal(out, np.rot90(pixels, k=-1))
  jpeg = decode_image(_encode(img, "JPEG", exif=exif.tobytes()), record_id="r")
  assert jpeg.shape == (3, 2, 3)


def test_truncated_jpeg_and_garbage_are_corrupt():
  noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  jpeg = _encode(Image.fromarray(noise), "JPEG")
  for data in (jpeg[: len(jpeg) // 2], b"definitely not an image", b""):
    with pytest.raises(BadRecord) as e:
      decode_image(data, record_id="rec7")
    assert e.value.reason == "corrupt_image" and e.value.record_id == "rec7"
    assert str(e.value).startswith("record rec7: corrupt_image: ")


def test_missing_path_is_missing_image(tmp_path):
  with pytest.raises(BadRecord, match="no.png") as e:
    decode_image(str(tmp_path / "no.png"), record_id="r")
  assert e.value.reason == "missing_image"


def _wide_image() -> np.ndarray:
  """uint8[20, 40, 3]: red left half, blue right half."""
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, :20] = (255, 0, 0)
  image[:, 20:] = (0, 0, 255)
  return image


def _norm(rgb) -> np.ndarray:
  return (np.asarray(rgb, np.float32) / 255 - np.asarray(MEAN, np.float32)) / np.asarray(
    STD, np.float32)


def test_pad_centres_the_image_on_the_mean_colour():
  out = preprocess(_wide_image(), size=40, aspect="pad", mean=MEAN, std=STD)
  assert out.dtype == np.float32 and out.shape == (40, 40, 3)
  fill = _norm([int(m * 255) for m in MEAN])
  np.testing.assert_allclose(out[:10], np.broadcast_to(fill, (10, 40, 3)), atol=1e-6)
  np.testing.assert_allclose(out[30:], np.broadcast_to(fill, (10, 40, 3)), atol=1e-6)
  np.testing.assert_allclose(out[10:30, :20], np.broadcast_to(_norm((255, 0, 0)), (20, 20, 3)),
                             atol=1e-6)


def test_pad_tall_image_then_resize():
  tall = _wide_image().transpose(1, 0, 2).copy()   # [40, 20, 3]
  out = preprocess(tall, size=16, aspect="pad", mean=MEAN, std=STD)
  assert out.shape == (16, 16, 3)
  fill = _norm([int(m * 255) for m in MEAN])
  # Away from the seam bicubic leaves a constant band constant.
  np.testing.assert_allclose(out[:, :2], np.broadcast_to(fill, (16, 2, 3)), atol=1e-6)
  np.testing.assert_allclose(out[:, -2:], np.broadcast_to(fill, (16, 2, 3)), atol=1e-6)


def test_resize_squashes_and_normalises_a_constant_image():
  image = np.full((30, 50, 3), (10, 128, 250), np.uint8)
  out = preprocess(image, size=24, aspect="resize", mean=MEAN, std=STD)
  assert out.shape == (24, 24, 3)
  np.testing.assert_allclose(out, np.broadcast_to(_norm((10, 128, 250)), out.shape), atol=1e-6)
  halves = preprocess(_wide_image(), size=20, aspect="resize", mean=MEAN, std=STD)
  np.testing.assert_allclose(halves[:, 0], np.broadcast_to(_norm((255, 0, 0)), (20, 3)),
                             atol=1e-6)


def test_crop_keeps_the_centre_of_the_long_side():
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 10:30] = 200   # the centre square; the cropped-away sides are black
  out = preprocess(image, size=20, aspect="crop", mean=MEAN, std=STD)
  np.testing.assert_allclose(out, np.broadcast_to(_norm((200, 200, 200)), out.shape), atol=1e-6)
  assert preprocess(_wide_image(), size=8, aspect="crop", mean=MEAN, std=STD).shape == (8, 8, 3)


def test_preprocess_is_deterministic_and_checks_its_arguments():
  image = np.random.default_rng(3).integers(0, 256, (17, 31, 3), dtype=np.uint8)
  for aspect in ("pad", "resize", "crop"):
    a = preprocess(image, size=12, aspect=aspect, mean=MEAN, std=STD)
    np.testing.assert_array_equal(a, preprocess(image, size=12, aspect=aspect, mean=MEAN,
                                                std=STD))
  with pytest.raises(ValueError, match="'letterbox'"):
    preprocess(image, size=12, aspect="letterbox", mean=MEAN, std=STD)
  with pytest.raises(ValueError, match="uint8"):
    preprocess(image.astype(np.float32), size=12, aspect="pad", mean=MEAN, std=STD)
