"""Sample grids drawn without matplotlib (gan/grid.py): their layout, their pixels, and generate's scale."""

from __future__ import annotations

import io

import numpy as np
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
