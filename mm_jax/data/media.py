"""Image decoding and preprocessing on the host, with Pillow and numpy (no JAX).

`decode_image` turns file bytes of any Pillow mode into uint8[H, W, 3] RGB, with the EXIF
orientation applied; anything that fails to decode raises `BadRecord`. `preprocess` turns
that into the vision tower's float32[S, S, 3] input the way LLaVA / CLIP do it: bicubic
resize of uint8 pixels, then /255 and per-channel mean/std. Both are deterministic, so a
sample decodes to the same pixels in every worker and on every restart.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from mm_jax.data.errors import CORRUPT_IMAGE, MISSING_IMAGE, BadRecord

ASPECTS = ("pad", "resize", "crop")

# Transparent pixels become white: transparent PNGs (icons, logos, diagrams, screenshots)
# are drawn to be seen on a white page, and dark line art on black would vanish. LLaVA's
# plain convert("RGB") instead exposes whatever colour the transparent pixels store
# (usually black), which is arbitrary.
_ALPHA_BACKGROUND = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# 8-bit value of a 16-bit one: 65535 / 257 == 255, so the full range maps onto 0..255.
_U16_TO_U8 = 257.0


def decode_image(data: bytes | str | os.PathLike, *, record_id: str) -> np.ndarray:
  """File bytes or a path -> uint8[H, W, 3] RGB with the EXIF orientation applied.

  Raises BadRecord("missing_image") when the path does not exist and
  BadRecord("corrupt_image") when the file is not a decodable image (including truncated).
  """
  where = "<bytes>" if isinstance(data, bytes) else os.fspath(data)
  try:
    source = io.BytesIO(data) if isinstance(data, bytes) else where
    with Image.open(source) as img:
      # load() forces the full decode here: Image.open only reads the header, and a
      # truncated file would otherwise fail later, somewhere far from its record.
      img.load()
      img = ImageOps.exif_transpose(img)
      return _to_rgb(img)
  except (FileNotFoundError, IsADirectoryError) as e:
    raise BadRecord(MISSING_IMAGE, record_id, f"{where}: {e.strerror}") from e
  except Exception as e:  # Pillow raises many exception types on malformed input.
    raise BadRecord(CORRUPT_IMAGE, record_id, f"{where}: {type(e).__name__}: {e}") from e


def _to_rgb(img: Image.Image) -> np.ndarray:
  """Any Pillow mode -> uint8[H, W, 3]."""
  if img.mode.startswith("I") or img.mode == "F":
    gray = _high_depth_to_u8(np.asarray(img))
    return np.repeat(gray[:, :, None], 3, axis=2)
  if img.mode in _ALPHA_MODES or "transparency" in img.info:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND)
    img = Image.alpha_composite(background, rgba)
  # Covers L, 1, P (opaque), CMYK, YCbCr and RGB itself.
  return np.array(img.convert("RGB"), dtype=np.uint8)


def _high_depth_to_u8(x: np.ndarray) -> np.ndarray:
  """Gray int/float[H, W] -> uint8[H, W] by scaling, never by clipping.

  Pillow's convert("L") clips I;16 / I at 255, so a 16-bit image comes out nearly all
  white. Values in the 16-bit range keep their absolute brightness (divide by 257);
  anything else (negative or wider ints, float images) is stretched from its min to max.
  """
  x = x.astype(np.float64)
  lo, hi = float(x.min()), float(x.max())
  if lo >= 0 and hi <= 65535 and np.all(x == np.round(x)):
    scaled = x / _U16_TO_U8
  elif hi > lo:
    scaled = (x - lo) * (255.0 / (hi - lo))
  else:
    scaled = np.zeros_like(x)
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray, *, size: int, aspect: str, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
  """uint8[H, W, 3] -> float32[size, size, 3], normalised with the tower's mean/std.

  aspect: "pad" pads to a square with the mean colour, centred, then resizes (LLaVA-1.5
  expand2square); "resize" squashes to size x size; "crop" resizes the shortest side to
  `size` then centre-crops (the CLIP image processor).
  """
  if len(std) != 3:
    raise ValueError(f"std needs 3 values, got {len(std)}")
  return normalise(fit(image, size=size, aspect=aspect, mean=mean), mean, std)


def fit(image: np.ndarray, *, size: int, aspect: str, mean: Sequence[float]) -> np.ndarray:
  """uint8[H, W, 3] -> uint8[size, size, 3] by `aspect` (see `preprocess`), not normalised.

  Video frames use it directly: they stay uint8 (4x smaller) until the pipeline stacks them.
  """
  _check_image(image)
  if size <= 0:
    raise ValueError(f"size must be positive, got {size}")
  if len(mean) != 3:
    raise ValueError(f"mean needs 3 values, got {len(mean)}")
  img = Image.fromarray(image)
  if aspect == "pad":
    img = _resize(_expand_to_square(img, mean), size, size)
  elif aspect == "resize":
    img = _resize(img, size, size)
  elif aspect == "crop":
    img = _centre_crop(_resize_shortest(img, size), size)
  else:
    raise ValueError(f"unknown aspect {aspect!r}; expected one of {ASPECTS}")
  return np.asarray(img)


def _check_image(image: np.ndarray) -> None:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"empty image {list(image.shape)}")


def _expand_to_square(img: Image.Image, mean: Sequence[float]) -> Image.Image:
  """Pads the short side equally on both sides (odd pixel after) with int(m * 255) per channel."""
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  fill = tuple(int(m * 255) for m in mean)
  square = Image.new("RGB", (side, side), fill)
  square.paste(img, ((side - w) // 2, (side - h) // 2))
  return square


def _resize(img: Image.Image, width: int, height: int) -> Image.Image:
  if img.size == (width, height):
    return img
  return img.resize((width, height), Image.BICUBIC)


def _resize_shortest(img: Image.Image, size: int) -> Image.Image:
  """Shortest side -> size, the long side truncated like the HF CLIP processor."""
  w, h = img.size
  if w <= h:
    return _resize(img, size, int(size * h / w))
  return _resize(img, int(size * w / h), size)


def _centre_crop(img: Image.Image, size: int) -> Image.Image:
  w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  return img.crop((left, top, left + size, top + size))


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8[S, S, 3] -> float32[S, S, 3]: /255, minus mean, over std."""
  x = pixels.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
