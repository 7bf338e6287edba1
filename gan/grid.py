"""Sample grids as PNG bytes, drawn without matplotlib: torchvision's `make_grid` and a PNG encoder (grey or RGB).

A few milliseconds for the tutorial's 4x4 where a matplotlib figure took a large part of a second, and no
font cache or backend to set up on a worker. The look: images in rows, grey on a white 2-pixel gap (the
tutorial's figure is white around its images), no title; `scale` enlarges each pixel. Greyscale images make an
8-bit greyscale PNG, colour ones an 8-bit RGB PNG. The encoder is the standard library's zlib: torchvision's own
(`torchvision.io.encode_png`) is deprecated since 0.29.
"""

from __future__ import annotations

import math
import struct
import zlib

import torch
from torchvision.utils import make_grid

GAP_PX = 2  # white between images, as the tutorial's figure leaves white between its axes


def image_grid_png(images: torch.Tensor, columns: int | None = None, scale: int = 1) -> bytes:
    """A grid of images in [-1, 1] (N, C, H, W), row by row, as PNG bytes: 8-bit greyscale for C = 1, RGB for C = 3.

    `columns` None makes it square (4x4 for 16 images); a per-class grid passes its images per
    class, so that each class gets its own row. `scale` repeats each pixel (nearest neighbour).
    """
    images = images.detach().float().cpu()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"a grid takes images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    columns = columns or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images, nrow=columns, padding=GAP_PX, pad_value=1.0)  # (3, H', W'): grey images made RGB
    pixels = (grid[: images.shape[1]] * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)  # grey: keep one
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return greyscale_png(pixels[0]) if images.shape[1] == 1 else rgb_png(pixels)


def greyscale_png(pixels: torch.Tensor) -> bytes:
    """PNG bytes of an 8-bit greyscale image (H, W) uint8: one IDAT, no filtering (zlib does the work)."""
    return _png(pixels.cpu(), colour_type=0)


def rgb_png(pixels: torch.Tensor) -> bytes:
    """PNG bytes of an 8-bit RGB image (3, H, W) uint8, written as `greyscale_png` writes its own."""
    return _png(pixels.cpu().permute(1, 2, 0).reshape(pixels.shape[1], -1), colour_type=2)  # rows of R, G, B


def _png(rows_of_samples: torch.Tensor, colour_type: int) -> bytes:
    """A PNG of (H, W·samples per pixel) uint8 rows: colour type 0 (grey) or 2 (RGB), 8 bits, one IDAT."""
    samples = {0: 1, 2: 3}[colour_type]
    height, width = rows_of_samples.shape[0], rows_of_samples.shape[1] // samples
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows_of_samples], dim=1)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)  # 8 bits, deflate, no interlace
    image = zlib.compress(rows.contiguous().numpy().tobytes(), 6)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", image) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
