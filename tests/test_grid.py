"""Sample grids drawn without matplotlib (gan/grid.py): their layout, their pixels, and generate's scale."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gan.grid import GAP_PX, image_grid_png
from job.commands.generate import GRID_SCALE

CELL = 28 + GAP_PX  # an image and the gap after it


def decoded(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.mode == "L"  # 8-bit greyscale
    return np.array(image)


def test_a_square_grid_by_default_and_one_row_per_class_when_given_columns():
    assert decoded(image_grid_png(torch.zeros(16, 1, 28, 28))).shape == (GAP_PX + 4 * CELL,) * 2
    per_class = decoded(image_grid_png(torch.zeros(30, 1, 28, 28), columns=10))
    assert per_class.shape == (GAP_PX + 3 * CELL, GAP_PX + 10 * CELL)


def test_pixels_map_minus_one_to_black_and_one_to_white_on_white_gaps_in_row_order():
    images = torch.full((2, 1, 28, 28), -1.0)
    images[1, 0, 0, 0] = 0.0  # the second image's corner: mid grey
    pixels = decoded(image_grid_png(images, columns=2))
    assert pixels[0, 0] == 255 and pixels[GAP_PX, GAP_PX] == 0  # a white gap, then the first image, black
    assert pixels[GAP_PX, GAP_PX + CELL] == 128  # 0.0 -> 127.5, rounded half to even
    assert (pixels[GAP_PX : GAP_PX + 28, GAP_PX + 28 : GAP_PX + CELL] == 255).all()  # the gap between them


def test_scale_repeats_each_pixel():
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    small, large = decoded(image_grid_png(images)), decoded(image_grid_png(images, scale=GRID_SCALE))
    assert np.array_equal(large, small.repeat(GRID_SCALE, axis=0).repeat(GRID_SCALE, axis=1))


def _chunks(png: bytes) -> dict[bytes, bytes]:
    """A PNG's chunks by kind (each kind once), their CRCs checked."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        assert struct.unpack(">I", png[at + 8 + length : at + 12 + length])[0] == zlib.crc32(kind + data)
        chunks[kind], at = data, at + 12 + length
    return chunks


def test_a_greyscale_grid_is_written_byte_for_byte_as_before():
    """Colour type 0, 8 bits, one IDAT of unfiltered rows compressed at level 6: the bytes of the encoder before
    RGB grids existed (the same zlib call on the same rows gives the same bytes)."""
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    png = image_grid_png(images, columns=3, scale=2)
    chunks = _chunks(png)
    pixels = decoded(png)
    height, width = pixels.shape
    assert chunks[b"IHDR"] == struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1).tobytes()
    assert chunks[b"IDAT"] == zlib.compress(rows, 6) and list(chunks) == [b"IHDR", b"IDAT", b"IEND"]


def test_an_rgb_grid_is_an_rgb_png_with_each_image_in_its_colours_on_white_gaps():
    images = torch.full((3, 3, 32, 32), -1.0)
    images[0, 0] = 1.0  # red
    images[1, 2] = 1.0  # blue
    images[2, :, 0, 0] = 0.0  # black with a mid-grey corner
    png = image_grid_png(images, columns=2)
    assert _chunks(png)[b"IHDR"][9] == 2  # colour type 2: RGB
    image = Image.open(io.BytesIO(png))
    cell = 32 + GAP_PX
    assert image.mode == "RGB" and image.size == (GAP_PX + 2 * cell, GAP_PX + 2 * cell)
    pixels = np.array(image)
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # the white gap
    assert tuple(pixels[GAP_PX, GAP_PX]) == (255, 0, 0)
    assert tuple(pixels[GAP_PX + 31, GAP_PX + cell + 31]) == (0, 0, 255)
    assert tuple(pixels[GAP_PX + cell, GAP_PX]) == (128, 128, 128)  # the third image, on the second row
    assert tuple(pixels[GAP_PX + cell + 1, GAP_PX + 1]) == (0, 0, 0)
    scaled = np.array(Image.open(io.BytesIO(image_grid_png(images, columns=2, scale=GRID_SCALE))))
    assert np.array_equal(scaled, pixels.repeat(GRID_SCALE, axis=0).repeat(GRID_SCALE, axis=1))


def test_a_grid_of_other_channel_counts_is_refused():
    with pytest.raises(ValueError, match="1 or 3"):
        image_grid_png(torch.zeros(2, 2, 28, 28))
