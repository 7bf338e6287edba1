"""Reading and writing IDX files (the format of MNIST and Fashion-MNIST), gzipped or not.

An IDX file may come from a bucket or a user: it is read as a stream, never inflated past the size its
header declares, and that size is capped by `MAX_IDX_BYTES`, so a small gzip bomb cannot exhaust memory.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

_UBYTE = 0x08  # the only element type MNIST-style files use
_GZIP_MAGIC = b"\x1f\x8b"
# The most bytes one IDX file may hold once decompressed, header included: 4 GiB. The largest legitimate
# file we know, MNIST's train-images, holds 47,040,016; 4 GiB is 91 times that, room for 5.4 million 28x28
# grey images (a user's own IDX file). Past it the header is damaged or the file is a decompression bomb
# (4 MB of gzip inflate to 4 GiB of zeros), and a worker would run out of memory holding it.
MAX_IDX_BYTES = 4 * 2**30
_CHUNK = 16 * 2**20  # bytes inflated per read: bounds what a read holds beyond the data itself


class IdxFormatError(ValueError):
    """An IDX file that is not what it claims to be (bad magic, shape or length)."""


def decode_idx(raw: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Parse IDX bytes (gzip is detected by its magic) into a uint8 tensor of the stored shape."""
    return _read_stream(io.BytesIO(raw), source)


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file from disk (streamed: a gzipped file is never held whole, compressed or not)."""
    path = Path(path)
    with open(path, "rb") as handle:
        return _read_stream(handle, str(path))


def _read_stream(stream: BinaryIO, source: str) -> torch.Tensor:
    """The IDX data in `stream`, gunzipped on the fly when it starts with gzip's magic."""
    gzipped = stream.read(2) == _GZIP_MAGIC
    stream.seek(0)
    if not gzipped:
        return _parse(stream, source)
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") as inflated:
            return _parse(inflated, source)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise IdxFormatError(f"{source} is a damaged gzip file ({err}); download it again") from None


def _too_large(source: str, size: int, shape: tuple[int, ...]) -> IdxFormatError:
    """The one-line refusal of a file whose header declares more than `MAX_IDX_BYTES`."""
    limit = f"{MAX_IDX_BYTES / 2**30:g} GiB" if MAX_IDX_BYTES >= 2**30 else f"{MAX_IDX_BYTES:,} bytes"
    return IdxFormatError(
        f"{source} declares {size:,} bytes (shape {shape}), more than the {limit} an IDX file may hold "
        f"(gan.idx.MAX_IDX_BYTES): a damaged file or a decompression bomb; download it again, "
        f"or keep each IDX file of your own under {limit}"
    )


def _parse(stream: BinaryIO, source: str) -> torch.Tensor:
    """Header, then exactly the declared bytes of data read in bounded chunks, then the check that nothing follows."""
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise IdxFormatError(
            f"{source} is not an IDX file (wrong magic number); download the MNIST-format files again or fix --data-dir"
        )
    if magic[2] != _UBYTE:
        raise IdxFormatError(
            f"{source} holds element type 0x{magic[2]:02x}, expected unsigned bytes (0x08); "
            "download the MNIST-format files again or fix --data-dir"
        )
    ndim = magic[3]
    dims = stream.read(4 * ndim)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise IdxFormatError(f"{source} has a truncated IDX header; download it again")
    shape = struct.unpack(f">{ndim}I", dims)
    expected = math.prod(shape)  # exact: np.prod wraps around in int64
    if 4 + len(dims) + expected > MAX_IDX_BYTES:  # before anything is allocated or inflated
        raise _too_large(source, 4 + len(dims) + expected, shape)
    # np.empty commits no memory until written (torch.empty would, under deterministic algorithms, fill it):
    # what is held grows with the data actually read, and the tensor shares it, with no copy.
    values = np.empty(expected, dtype=np.uint8)
    view = memoryview(values)
    filled = 0
    while filled < expected:
        got = stream.readinto(view[filled : filled + _CHUNK])
        if not got:
            break
        filled += got
    if filled < expected or stream.read(1):  # one byte past the declared data is enough to know there is more
        held = f"{filled}" if filled < expected else "more"
        raise IdxFormatError(
            f"{source} should hold {expected} bytes of data for shape {shape} but holds {held}; "
            "the file is truncated or damaged, download it again"
        )
    return torch.from_numpy(values.reshape(shape))


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
