"""IDX files, where the data comes from, and how it is split across ranks."""

import gzip
import re
import struct
import tracemalloc
import zlib

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gan.data import DataError, cache_dir, iterate_batches, load_split, resolve_data_dir, shard_indices
from gan.idx import IdxFormatError, decode_idx, encode_idx, read_idx, write_idx
from tests.conftest import write_tiny_dataset


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_idx_round_trip_plain_and_gzipped(tmp_path, name):
    values = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / name, values)
    assert torch.equal(read_idx(tmp_path / name), values)


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.randoms())
@settings(max_examples=50, deadline=None)
def test_idx_round_trip_any_shape(shape, rnd):
    values = torch.tensor([rnd.randrange(256) for _ in range(int(torch.tensor(shape).prod()))], dtype=torch.uint8).view(
        *shape
    )
    assert torch.equal(decode_idx(encode_idx(values)), values)


@st.composite
def near_idx_files(draw) -> bytes:
    """A valid IDX file, whole or cut short, lengthened, or with one byte changed (header or data); maybe gzipped."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    raw = bytearray(
        encode_idx(
            torch.randint(
                0, 256, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))), dtype=torch.uint8
            )
        )
    )
    how = draw(st.sampled_from(["whole", "cut", "longer", "changed"]))
    if how == "cut":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "longer":
        raw += draw(st.binary(min_size=1, max_size=8))
    elif how == "changed":
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    return gzip.compress(bytes(raw)) if draw(st.booleans()) else bytes(raw)


@given(st.one_of(st.binary(max_size=64), near_idx_files()))
@settings(max_examples=300, deadline=None)
def test_idx_reader_rejects_garbage_with_its_own_error(raw):
    """Random bytes and damaged IDX files: refused with IdxFormatError (saying what to do), or, when
    accepted, an exact IDX file read whole (a changed data byte is still a valid file)."""
    try:
        values = decode_idx(raw)
    except IdxFormatError as err:  # the only acceptable failure, and it says what to do
        assert "download" in str(err)
        event("refused")
        return
    event("accepted")
    plain = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    assert encode_idx(values) == plain  # what it accepts is an exact IDX file, read whole: no trailing or missing byte


def test_idx_reader_refuses_each_kind_of_damage_it_must():
    """The damaged files the property above may or may not draw, each refused for certain."""
    raw = encode_idx(torch.arange(24, dtype=torch.uint8).view(2, 3, 4))
    header = 4 + 3 * 4  # magic, then one big-endian size per dimension
    for damaged in (
        raw[:-1],
        raw + b"\x00",
        raw[:header],
        raw[:3],
        b"",
        bytes([raw[0] ^ 1]) + raw[1:],
        raw[:7] + bytes([raw[7] + 1]) + raw[8:],
    ):
        for form in (damaged, gzip.compress(damaged)):
            with pytest.raises(IdxFormatError, match="download"):
                decode_idx(form)


def test_idx_reader_names_wrong_magic_and_truncation():
    good = encode_idx(torch.zeros(2, 28, 28, dtype=torch.uint8))
    with pytest.raises(IdxFormatError, match="wrong magic"):
        decode_idx(b"\x01" + good[1:], "f.idx")
    with pytest.raises(IdxFormatError, match="truncated"):
        decode_idx(good[:-10], "f.idx")
    with pytest.raises(IdxFormatError, match="damaged gzip"):
        decode_idx(gzip.compress(good)[:-8], "f.idx.gz")


# Gzip bombs and oversized headers: refused before they are inflated or allocated (issue 28) ---------

BOMB_BYTES = 64 * 2**20  # inflated size of the test's bombs: each is ~64 KB of gzip
SMALL_CAP = 2**20  # MAX_IDX_BYTES in the tests that patch it, so that a bomb "past the cap" stays small


def _idx_header(shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def _gzip_bomb(shape: tuple[int, ...], zeros: int = BOMB_BYTES) -> bytes:
    """A gzipped IDX header for `shape` followed by `zeros` zero bytes, compressed ~1000:1 a MiB at a time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip's header and trailer
    parts, mib = [compressor.compress(_idx_header(shape))], bytes(2**20)
    parts += [compressor.compress(mib) for _ in range(zeros // 2**20)]
    return b"".join([*parts, compressor.flush()])


def _peak_bytes(call) -> int:
    """The most memory Python (and numpy, which reports to tracemalloc) held at once while `call` ran."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_gzip_bomb_past_the_cap_is_refused_without_being_inflated(monkeypatch):
    """A well-formed IDX file, gzipped, whose data (all of it really there) inflate past the cap."""
    monkeypatch.setattr("gan.idx.MAX_IDX_BYTES", SMALL_CAP)
    bomb = _gzip_bomb((64, 1024, 1024))  # declares and holds 64 MiB
    assert len(bomb) < BOMB_BYTES // 500

    def decode() -> None:
        with pytest.raises(IdxFormatError) as refused:
            decode_idx(bomb, "bomb-idx3-ubyte.gz")
        message = str(refused.value)
        assert "\n" not in message and "bomb-idx3-ubyte.gz" in message and "MAX_IDX_BYTES" in message
        assert "1,048,576 bytes" in message and "download it again" in message

    assert _peak_bytes(decode) < 4 * 2**20  # nothing near the 64 MiB it would inflate to


def test_a_gzip_bomb_behind_a_small_header_is_inflated_only_as_far_as_the_header_says():
    """The header declares 4 bytes; 64 MiB of zeros follow. The default cap: the declared size bounds the reading."""
    bomb = _gzip_bomb((4,))

    def decode() -> None:
        with pytest.raises(IdxFormatError, match="should hold 4 bytes of data"):
            decode_idx(bomb, "bomb.gz")

    assert _peak_bytes(decode) < 4 * 2**20


def test_a_header_declaring_more_than_the_cap_is_refused_before_anything_is_allocated(tmp_path):
    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(_idx_header((65536, 65536, 2)) + bytes(64))  # declares 8 GiB, the default cap is 4 GiB
    for name, data in ((path, path.read_bytes()), (path.with_suffix(".gz"), gzip.compress(path.read_bytes()))):
        name.write_bytes(data)
        with pytest.raises(
            IdxFormatError, match=re.escape(f"{name} declares 8,589,934,608 bytes") + ".* more than the 4 GiB"
        ):
            read_idx(name)


def test_an_idx_file_exactly_at_the_cap_is_read_and_one_byte_more_is_refused(monkeypatch):
    monkeypatch.setattr("gan.idx.MAX_IDX_BYTES", SMALL_CAP)
    header = len(_idx_header((1,)))
    fits = torch.full((SMALL_CAP - header,), 7, dtype=torch.uint8)
    for raw in (encode_idx(fits), gzip.compress(encode_idx(fits))):
        assert torch.equal(decode_idx(raw), fits)
    over = encode_idx(torch.zeros(SMALL_CAP - header + 1, dtype=torch.uint8))
    for raw in (over, gzip.compress(over)):
        with pytest.raises(IdxFormatError, match="MAX_IDX_BYTES"):
            decode_idx(raw)


def test_wrong_image_size_is_a_data_error(tmp_path):
    folder = write_tiny_dataset(tmp_path / "d")
    write_idx(folder / "train-images-idx3-ubyte.gz", torch.zeros(96, 32, 32, dtype=torch.uint8))
    with pytest.raises(DataError, match="expected 28x28"):
        load_split(folder, "train")


def test_load_split_gives_images_labels_and_a_stable_fingerprint(tiny_data_dir):
    first, again = load_split(tiny_data_dir, "train", limit=50), load_split(tiny_data_dir, "train", limit=50)
    assert first.images.shape == (50, 1, 28, 28) and first.images.dtype == torch.uint8
    assert first.labels.shape == (50,)
    assert first.fingerprint == again.fingerprint != load_split(tiny_data_dir, "train", limit=49).fingerprint


def test_real_fashion_mnist_loads(fashion_mnist_dir):
    train = load_split(fashion_mnist_dir, "train")
    assert train.images.shape == (60000, 1, 28, 28)
    assert int(train.labels.max()) == 9


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_equal_and_cover_the_set(world_size):
    shards = [shard_indices(1200, rank, world_size, epoch=1, seed=7) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    combined = torch.cat(shards)
    assert len(set(combined.tolist())) == 1200 == len(combined)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_change_every_epoch_and_repeat_for_the_same_seed(world_size):
    one = shard_indices(1000, 0, world_size, epoch=1, seed=7)
    assert not torch.equal(one, shard_indices(1000, 0, world_size, epoch=2, seed=7))
    assert torch.equal(one, shard_indices(1000, 0, world_size, epoch=1, seed=7))


def test_uneven_set_drops_fewer_than_world_size_images_and_stays_disjoint():
    shards = [shard_indices(1000, rank, 3, epoch=1, seed=0) for rank in range(3)]
    combined = torch.cat(shards).tolist()
    assert len(combined) == len(set(combined)) == 999


def test_batches_are_scaled_to_unit_range_and_keep_the_last_partial_batch():
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 28, 28).contiguous()
    batches = list(iterate_batches(images, torch.arange(3), batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 1]
    assert batches[0][0].max() == -1 and batches[0][1].min() == 1


def test_explicit_data_dir_wins_and_missing_files_are_named(tmp_path, tiny_data_dir):
    assert resolve_data_dir("fashion-mnist", tiny_data_dir) == tiny_data_dir
    (tiny_data_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        resolve_data_dir("fashion-mnist", tiny_data_dir)
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir("fashion-mnist", tmp_path / "nowhere")


def test_user_cache_comes_before_the_system_copy(tmp_path):
    cached = write_tiny_dataset(cache_dir("fashion-mnist"))
    assert resolve_data_dir("fashion-mnist") == cached


def test_system_copy_is_found_when_the_cache_is_empty(fashion_mnist_dir):
    assert resolve_data_dir("fashion-mnist") == fashion_mnist_dir


def test_offline_without_any_copy_says_how_to_provide_the_files(monkeypatch):
    import torchvision.datasets

    # The real download code, pointed at a closed port on loopback: offline on any machine.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError, match="--data-dir"):
        resolve_data_dir("mnist")


def test_shards_for_every_size_of_an_elastic_run_cover_the_same_images_in_the_same_steps():
    multiple = 6  # lcm(1, 2, 3): an elastic run of 1-3 workers
    seen = {}
    for world_size in (1, 2, 3):
        shards = [
            shard_indices(1003, rank, world_size, epoch=4, seed=1, multiple=multiple) for rank in range(world_size)
        ]
        assert all(len(shard) == 1002 // world_size for shard in shards)
        seen[world_size] = set(torch.cat(shards).tolist())
    assert seen[1] == seen[2] == seen[3] and len(seen[1]) == 1002  # same images: the epoch does not depend on the size
    with pytest.raises(ValueError):
        shard_indices(1003, 0, 4, epoch=1, seed=1, multiple=6)
