"""Sample grids as PNG bytes, drawn without matplotlib: torchvision's `make_grid` and a greyscale PNG encoder.

A few milliseconds for the tutorial's 4x4 where a matplotlib figure took a large part of a second, and no
font cache or backend to set up on a worker. The look: images in rows, grey on a white 2-pixel gap (the
tutorial's figure is white around its images), no title; `scale` enlarges each pixel. The encoder is the
standard library's zlib: torchvision's own (`torchvision.io.encode_png`) is deprecated since 0.29.
"""

from __future__ import annotations

import math
import struct
import zlib

import torch
from torchvision.utils import make_grid

GAP_PX = 2  # white between images, as the tutorial's figure leaves white between its axes


def image_grid_png(images: torch.Tensor, columns: int | None = None, scale: int = 1) -> bytes:
    """A grid of images in [-1, 1] (N, 1, 28, 28), row by row, as 8-bit greyscale PNG bytes.

    `columns` None makes it square (4x4 for 16 images); a per-class grid passes its images per
    class, so that each class gets its own row. `scale` repeats each pixel (nearest neighbour).
    """
    images = images.detach().float().cpu()
    columns = columns or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images, nrow=columns, padding=GAP_PX, pad_value=1.0)[:1]  # make_grid makes grey RGB: keep one
    pixels = (grid * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return greyscale_png(pixels[0])


def greyscale_png(pixels: torch.Tensor) -> bytes:
    """PNG bytes of an 8-bit greyscale image (H, W) uint8: one IDAT, no filtering (zlib does the work)."""
    height, width = pixels.shape
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), pixels.cpu()], dim=1)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, greyscale, deflate, no interlace
    image = zlib.compress(rows.numpy().tobytes(), 6)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", image) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
