"""Reading and writing IDX files (the format of MNIST and Fashion-MNIST), gzipped or not."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

_UBYTE = 0x08  # the only element type MNIST-style files use


class IdxFormatError(ValueError):
    """An IDX file that is not what it claims to be (bad magic, shape or length)."""


def decode_idx(raw: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Parse IDX bytes (gzip is detected by its magic) into a uint8 tensor of the stored shape."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise IdxFormatError(f"{source} is a damaged gzip file ({err}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(
            f"{source} is not an IDX file (wrong magic number); download the MNIST-format files again or fix --data-dir"
        )
    if raw[2] != _UBYTE:
        raise IdxFormatError(
            f"{source} holds element type 0x{raw[2]:02x}, expected unsigned bytes (0x08); "
            "download the MNIST-format files again or fix --data-dir"
        )
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_len:
        raise IdxFormatError(f"{source} has a truncated IDX header; download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = math.prod(shape)  # exact: np.prod wraps around in int64
    if len(raw) - header_len != expected:
        raise IdxFormatError(
            f"{source} should hold {expected} bytes of data for shape {shape} but holds "
            f"{len(raw) - header_len}; the file is truncated or damaged, download it again"
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)
    return torch.from_numpy(array.copy())


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file from disk."""
    path = Path(path)
    return decode_idx(path.read_bytes(), source=str(path))


def encode_idx(values: torch.Tensor) -> bytes:
    """IDX bytes for a uint8 tensor (the inverse of `decode_idx`)."""
    if values.dtype != torch.uint8:
        raise TypeError("IDX files written here hold unsigned bytes; convert to torch.uint8 first")
    header = bytes([0, 0, _UBYTE, values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    return header + values.contiguous().numpy().tobytes()


def write_idx(path: str | Path, values: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file, gzipped when the name ends in `.gz`."""
    path = Path(path)
    data = encode_idx(values)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=1)
    path.write_bytes(data)
