"""One image file as the networks take it: decoded with Pillow, converted to 1 or 3 channels, centre-cropped and
resized to a square, as uint8 (C, R, R).

The rules, one each (docs/data.md#shape):
- colour: an image with transparency (RGBA, LA, a palette with a transparent colour) is laid over white, where
  its transparent pixels show; 16-bit and float images are scaled to 8 bits; then RGB for 3 channels, or
  ITU-R 601 luma ("L") for 1;
- size: the largest centred square is cut out (the longer side loses equally on both ends, an odd pixel at the
  end), then resized to R x R with Lanczos filtering; an image already R x R is taken as it is.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Pixels one image may have (about 16k x 16k): beyond it a file is taken for a decompression bomb and refused
# before it is decoded (Pillow's own check, made an error).
MAX_IMAGE_PIXELS = 256 * 1024 * 1024
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


class ImageError(ValueError):
    """An image file that cannot be used; the message names it and says how to fix it."""


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding its pixels."""

    width: int
    height: int
    grey: bool  # grey levels only (with or without alpha)


def read_header(raw: bytes | BinaryIO, name: str) -> Header:
    """The size and kind of an image file (its bytes, or a file open for reading), from its header alone; ImageError
    when it is not one Pillow reads."""
    with _opened(raw, name) as image:
        return Header(image.width, image.height, image.mode in GREY_MODES)


def decode(raw: bytes, name: str, resolution: int, channels: int) -> np.ndarray:
    """The image in `raw` as uint8 (channels, resolution, resolution), by the module's rules."""
    with _opened(raw, name) as image:
        try:
            image.load()
            return convert(image, resolution, channels)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ImageError(f"{name} does not decode ({_reason(err)}); replace or remove it") from None


def convert(image: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """A decoded image as uint8 (channels, resolution, resolution), by the module's rules."""
    array = np.asarray(_square(_flat(image, channels), resolution), dtype=np.uint8)
    if channels == 1:
        array = array[:, :, None]
    return array.transpose(2, 0, 1)


def convert_array(pixels: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """uint8 (C, H, W) pixels (a packed dataset's own, 1 or 3 channels) at another shape, by the same rules."""
    if pixels.shape[0] == channels and pixels.shape[1:] == (resolution, resolution):
        return pixels
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    return convert(image, resolution, channels)


class _opened:
    """`Image.open` of the bytes, with Pillow's bomb check an error at MAX_IMAGE_PIXELS, closed after use."""

    def __init__(self, raw: bytes | BinaryIO, name: str) -> None:
        self.raw, self.name = raw, name

    def __enter__(self) -> Image.Image:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2  # Pillow refuses at twice this, and warns from it
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                self.image = Image.open(io.BytesIO(self.raw) if isinstance(self.raw, bytes) else self.raw)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageError(
                    f"{self.name} is larger than {MAX_IMAGE_PIXELS:,} pixels (a decompression bomb, or an image far "
                    "larger than any resolution a run takes); scale it down or remove it"
                ) from None
            except (UnidentifiedImageError, OSError, ValueError) as err:
                reason = _reason(err)
                raise ImageError(f"{self.name} is not an image Pillow reads ({reason}); replace or remove it") from None
        if self.image.width * self.image.height > MAX_IMAGE_PIXELS:
            self.image.close()
            raise ImageError(f"{self.name} is larger than {MAX_IMAGE_PIXELS:,} pixels; scale it down or remove it")
        return self.image

    def __exit__(self, *exc: object) -> None:
        self.image.close()


def _reason(err: BaseException) -> str:
    """The error's text in one short line, without the in-memory file Pillow names (`<_io.BytesIO object at 0x...>`)."""
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-f]+>", "", " ".join(str(err).split())) or type(err).__name__
    return text[:160]


def _flat(image: Image.Image, channels: int) -> Image.Image:
    """`image` with its transparency laid over white, in 8 bits, as RGB (3 channels) or L (1)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        scale = 1 / 257 if image.mode.startswith("I;16") or image.mode == "I" else 255.0
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB" if channels == 3 else "L")


def _square(image: Image.Image, resolution: int) -> Image.Image:
    """The largest centred square of `image`, resized to `resolution` x `resolution` with Lanczos filtering."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if (width, height) != (side, side):
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image
