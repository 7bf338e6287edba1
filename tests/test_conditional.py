"""Class-conditional data and sampling: label batches, the labels `generate` asks for, per-class grids."""

import struct

import torch

import gan.sampling
from gan.data import iterate_batches
from gan.models import Generator
from gan.plots import image_grid_png
from gan.sampling import class_grid_inputs, labels_split_evenly, sample


def _images_that_name_their_index(count):
    return torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, 28, 28).contiguous()


def test_batches_with_labels_pair_each_image_with_its_own_label_as_int64():
    images_u8 = _images_that_name_their_index(7)
    labels = torch.tensor([5, 0, 1, 9, 2, 2, 3], dtype=torch.uint8)  # IDX labels are uint8
    order = torch.tensor([6, 2, 0, 3, 5])
    pairs = list(iterate_batches(images_u8, order, 2, labels=labels))
    plain = list(iterate_batches(images_u8, order, 2))
    assert [tuple(images.shape) for images, _ in pairs] == [(2, 1, 28, 28), (2, 1, 28, 28), (1, 1, 28, 28)]
    for (images, batch_labels), alone in zip(pairs, plain):
        assert torch.equal(images, alone)  # the images are those of the call without labels
        assert batch_labels.dtype == torch.int64 and batch_labels.device == images.device
        indices = torch.round((images[:, 0, 0, 0] + 1) * 127.5).long()
        assert torch.equal(batch_labels, labels.long()[indices])


def test_labels_split_evenly_over_the_listed_classes_in_order():
    assert labels_split_evenly(10, [3, 5]).tolist() == [3] * 5 + [5] * 5
    assert labels_split_evenly(7, [2, 0, 1]).tolist() == [2, 2, 2, 0, 0, 1, 1]  # the first classes take the remainder
    assert labels_split_evenly(4, range(10)).tolist() == [0, 1, 2, 3]
    assert labels_split_evenly(3, [4]).dtype == torch.int64


def test_class_grid_has_one_row_per_class_and_one_noise_vector_per_column():
    noise, labels = class_grid_inputs(num_classes=10, per_class=10, noise_dim=8, seed=3)
    assert noise.shape == (100, 8) and labels.shape == (100,)
    assert torch.equal(labels.view(10, 10), torch.arange(10).view(10, 1).expand(10, 10))
    rows = noise.view(10, 10, 8)
    assert all(torch.equal(rows[0], row) for row in rows)  # down a column only the label changes
    assert not torch.equal(rows[0, 0], rows[0, 1])


def test_sample_passes_labels_with_their_noise_chunk_by_chunk(monkeypatch):
    torch.manual_seed(0)
    generator = Generator(8, num_classes=10)
    noise, labels = torch.randn(10, 8), torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    whole = sample(generator, noise, labels)
    monkeypatch.setattr(gan.sampling, "CHUNK", 3)
    torch.testing.assert_close(sample(generator, noise, labels), whole)
    one_by_one = torch.cat([sample(generator, noise[i : i + 1], labels[i : i + 1]) for i in range(10)])
    torch.testing.assert_close(one_by_one, whole)
    assert not torch.equal(sample(generator, noise, (labels + 1) % 10), whole)


def _png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])  # IHDR: width, height


def test_image_grid_draws_one_row_of_ten_per_class_when_given_ten_columns():
    images = torch.zeros(30, 1, 28, 28)
    width, height = _png_size(image_grid_png(images, columns=10))
    assert width / height == 10 / 3
    width, height = _png_size(image_grid_png(torch.zeros(16, 1, 28, 28)))
    assert width == height  # the tutorial's square 4x4 by default
