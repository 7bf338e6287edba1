"""Class-conditional training and its commands (issue 14): label batches, the labels `generate` asks
for and per-class grids (gan/); then `train --conditional` in one process, what it records, its
sample grid, `generate --label/--per-class`, `evaluate` and `promote` on its checkpoints, and the
bad input that is refused in one line (exit 2, nothing written)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import gan.sampling
import job.runtime.driver
from gan.classifier import Classifier
from gan.data import dataset_info, iterate_batches
from gan.models import Generator
from gan.grid import GAP_PX, image_grid_png
from gan.sampling import class_grid_inputs, labels_split_evenly, sample
from job.cli import build_parser, main
from job.promotion.evaluation import evaluate_state
from job.commands.generate import GRID_SCALE
from job.config import RECIPES, TrainConfig
from job.storage.checkpoint import checkpoint_folders, read_checkpoint, write_checkpoint
from job.storage.location import resolve_location
from tests.conftest import metrics_rows, train_one_process, write_tiny_dataset
from tests.faultproxy import tree_state


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
    assert _png_size(image_grid_png(images, columns=10)) == grid_px(10, 3)
    width, height = _png_size(image_grid_png(torch.zeros(16, 1, 28, 28)))
    assert width == height  # the tutorial's square 4x4 by default


# The job: train --conditional and its commands ------------------------------------------------

NUM_CLASSES = dataset_info("fashion-mnist").num_classes  # 10


def grid_px(columns: int, rows: int, scale: int = 1) -> tuple[int, int]:
    """(width, height) of an image_grid_png of 28x28 images: GAP_PX of white before each, and one more at the end."""
    return scale * (GAP_PX + columns * (28 + GAP_PX)), scale * (GAP_PX + rows * (28 + GAP_PX))


@pytest.fixture(autouse=True)
def ray_must_not_start(monkeypatch):
    """Every command here runs without Ray; a refused `train` must stop before it."""

    def refuse() -> None:
        raise AssertionError("reached Ray: job.runtime.driver.connect_ray() was called")

    monkeypatch.setattr(job.runtime.driver, "connect_ray", refuse)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One conditional run (with the training-time quality probe) and one unconditional run,
    1 epoch each on tiny data."""
    root = tmp_path_factory.mktemp("conditional")
    data = write_tiny_dataset(root / "data")
    return {
        "data": data,
        "conditional": train_one_process(root / "runs", data, "cond", conditional=True, eval_every=1, eval_num=60),
        "plain": train_one_process(root / "runs", data, "plain"),
    }


def newest_checkpoint(run: Path) -> dict:
    return read_checkpoint(checkpoint_folders(resolve_location(str(run)))[0])


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    return struct.unpack(">II", path.read_bytes()[16:24])


def refused(argv: list[str], named: str, capsys) -> str:
    """Run the CLI; assert exit 2 and one error line naming `named`, no traceback. Returns the line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, captured.err[-800:])
    assert lines[0].startswith("gan-job: ") and named in lines[0], lines[0]
    return lines[0]


# Training: the recipe, what a run records, its grid ------------------------------------------


def test_the_conditional_recipe_is_stable_plus_conditional():
    config = TrainConfig(recipe="conditional", run_name="r", storage="/tmp/unused")
    stable = TrainConfig(recipe="stable", run_name="r", storage="/tmp/unused")
    assert config.conditional and not stable.conditional
    assert {name: getattr(config, name) for name in RECIPES["stable"]} == RECIPES["stable"]
    assert TrainConfig(recipe="tutorial", conditional=True, run_name="r", storage="/tmp/unused").conditional
    # a flag still wins
    assert TrainConfig(recipe="conditional", lr=1e-3, run_name="r", storage="/tmp/unused").lr == 1e-3


def test_the_conditional_switch_comes_from_its_flag_or_variable(monkeypatch):
    assert build_parser().parse_args(["train", "--conditional"]).conditional is True
    monkeypatch.setenv("GAN_JOB_CONDITIONAL", "true")
    assert build_parser().parse_args(["train"]).conditional is True


def test_a_conditional_run_records_its_classes_in_model_json_and_every_checkpoint(runs):
    model = json.loads((runs["conditional"] / "artifacts" / "model.json").read_text())
    assert model["conditional"] is True and model["num_classes"] == NUM_CLASSES
    assert model["config"]["conditional"] is True
    assert model["generator"]["kwargs"] == {"noise_dim": 100, "num_classes": NUM_CLASSES}
    state = newest_checkpoint(runs["conditional"])
    assert state["config"]["conditional"] is True and state["num_classes"] == NUM_CLASSES
    assert state["generator"]["project.1.gain.weight"].shape == (NUM_CLASSES, 7 * 7 * 256)  # class batch norms
    assert "label_projection.weight" in state["discriminator"]
    # the training-time probe samples the conditional G with labels
    assert "quality" in metrics_rows(runs["conditional"])[0]


def test_an_unconditional_run_records_zero_classes_and_keeps_format_2s_keys(runs):
    model = json.loads((runs["plain"] / "artifacts" / "model.json").read_text())
    assert model["conditional"] is False and model["num_classes"] == 0
    assert model["generator"]["kwargs"] == {"noise_dim": 100, "num_classes": 0}
    state = newest_checkpoint(runs["plain"])
    assert state["config"]["conditional"] is False and "num_classes" not in state
    assert state["fixed_noise"].shape == (16, 100)


def test_a_conditional_grid_has_one_row_per_class_and_an_unconditional_one_stays_4x4(runs):
    width, height = png_size(runs["conditional"] / "artifacts" / "samples" / "epoch_001.png")
    assert (width, height) == grid_px(10, NUM_CLASSES)  # 10 rows (classes) of 10
    assert png_size(runs["plain"] / "artifacts" / "samples" / "epoch_001.png") == grid_px(4, 4)


def test_a_resumed_conditional_run_keeps_its_grid_noise(tmp_path, tiny_data_dir):
    run = train_one_process(tmp_path / "runs", tiny_data_dir, "cond", conditional=True, epochs=1)
    first = newest_checkpoint(run)["fixed_noise"]
    assert first.shape == (NUM_CLASSES * 10, 100)
    train_one_process(tmp_path / "runs", tiny_data_dir, "cond", conditional=True, epochs=2)
    resumed = newest_checkpoint(run)
    assert resumed["epoch"] == 2 and torch.equal(resumed["fixed_noise"], first)
    assert metrics_rows(run)[1]["resumed"]["from_epoch"] == 1


# generate ------------------------------------------------------------------------------------


def test_generate_per_class_writes_images_and_int64_labels_in_class_order(runs, tmp_path, capsys):
    grid, npy = tmp_path / "grid.png", tmp_path / "images.npy"
    argv = [
        "generate",
        "--from",
        str(runs["conditional"]),
        "--per-class",
        "--num",
        "30",
        "--out",
        str(grid),
        "--npy",
        str(npy),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "images.labels.npy" in out and "3 of each of the classes 0,1,2,3,4,5,6,7,8,9" in out
    images, labels = np.load(npy), np.load(tmp_path / "images.labels.npy")
    assert images.shape == (30, 28, 28) and images.dtype == np.float32 and -1 <= images.min() <= images.max() <= 1
    assert labels.dtype == np.int64 and labels.tolist() == [k for k in range(NUM_CLASSES) for _ in range(3)]
    assert png_size(grid) == grid_px(3, NUM_CLASSES, GRID_SCALE)  # a row per class, its 3 images


def test_generate_label_3_5_num_10_makes_five_of_each_in_that_order(runs, tmp_path):
    grid, npy = tmp_path / "grid.png", tmp_path / "images.npy"
    argv = [
        "generate",
        "--from",
        str(runs["conditional"]),
        "--label",
        "3,5",
        "--num",
        "10",
        "--out",
        str(grid),
        "--npy",
        str(npy),
    ]
    assert main(argv) == 0
    assert np.load(npy).shape == (10, 28, 28)
    assert np.load(tmp_path / "images.labels.npy").tolist() == [3] * 5 + [5] * 5
    assert png_size(grid) == grid_px(5, 2, GRID_SCALE)


def test_generate_on_a_conditional_model_without_classes_asked_makes_10_of_every_class(runs, tmp_path):
    npy = tmp_path / "images.npy"
    assert (
        main(["generate", "--from", str(runs["conditional"]), "--out", str(tmp_path / "grid.png"), "--npy", str(npy)])
        == 0
    )
    assert np.load(tmp_path / "images.labels.npy").tolist() == [k for k in range(NUM_CLASSES) for _ in range(10)]


def test_the_label_decides_the_image(runs, tmp_path):
    """The same noise with another label gives another image: the labels reach G."""
    paths = {}
    for label in ("3", "5"):
        paths[label] = tmp_path / f"{label}.npy"
        argv = [
            "generate",
            "--from",
            str(runs["conditional"]),
            "--label",
            label,
            "--num",
            "4",
            "--out",
            str(tmp_path / "g.png"),
        ]
        assert main([*argv, "--npy", str(paths[label])]) == 0
    assert not np.array_equal(np.load(paths["3"]), np.load(paths["5"]))


def test_generate_on_an_unconditional_model_writes_no_labels(runs, tmp_path):
    npy = tmp_path / "images.npy"
    assert (
        main(
            [
                "generate",
                "--from",
                str(runs["plain"]),
                "--num",
                "5",
                "--out",
                str(tmp_path / "grid.png"),
                "--npy",
                str(npy),
            ]
        )
        == 0
    )
    assert np.load(npy).shape == (5, 28, 28) and not (tmp_path / "images.labels.npy").exists()


# evaluate --------------------------------------------------------------------------------------


class RecordingEvaluator:
    """Stands in for gan.metrics.QualityEvaluator: keeps the images it is given."""

    real_test = torch.zeros(1, 1, 28, 28)
    real_test_labels = torch.zeros(1, dtype=torch.long)
    classifier = Classifier().eval()  # untrained: label accuracy's values are not what these tests check

    def compute(self, images: torch.Tensor) -> dict:
        self.images = images
        return {}

    def describe(self) -> dict:
        return {}


def test_evaluate_samples_a_conditional_checkpoint_with_every_class_alike(runs):
    evaluator = RecordingEvaluator()
    result = evaluate_state(evaluator, newest_checkpoint(runs["conditional"]), "src", "fashion-mnist", num=40, seed=0)
    assert evaluator.images.shape == (40, 1, 28, 28) and result["num_images"] == 40
    assert result["conditional"] is True and result["label_accuracy"]["generated"]["count_per_class"] == [4] * 10


# Bad input: one line naming the flag, exit 2, nothing written ----------------------------------


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--label", "12"], "--label"),  # not a class of this 10-class model
        (["--label", "three"], "--label"),
        (["--label", "-1"], "--label"),
        (["--label", "3,3"], "--label"),
        (["--label", "3", "--per-class"], "--per-class"),
        (["--label", "3,5", "--num", "7"], "--num"),
        (["--per-class", "--num", "25"], "--num"),
        (["--num", "64"], "--num"),  # neither flag: every class, and 64 does not split over 10
    ],
    ids=["label out of range", "label not a number", "label negative", "label twice", "label with per-class",
         "num uneven over labels", "num uneven per class", "num uneven by default"],
)  # fmt: skip
def test_bad_generate_input_on_a_conditional_model_is_one_line(runs, tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    out.mkdir()
    argv = [
        "generate",
        "--from",
        str(runs["conditional"]),
        "--out",
        str(out / "grid.png"),
        "--npy",
        str(out / "images.npy"),
        *extra,
    ]
    line = refused(argv, named, capsys)
    assert "--label" in line or named in line
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("extra, named", [(["--label", "3"], "--label"), (["--per-class"], "--per-class")])
def test_classes_asked_of_an_unconditional_model_are_refused(runs, tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    out.mkdir()
    line = refused(["generate", "--from", str(runs["plain"]), "--out", str(out / "grid.png"), *extra], named, capsys)
    assert "--conditional" in line and list(out.iterdir()) == []


@pytest.mark.parametrize(
    "run, flags", [("conditional", []), ("plain", ["--conditional"]), ("plain", ["--recipe", "conditional"])]
)
def test_resuming_with_the_other_conditional_setting_is_refused(runs, run, flags, capsys):
    folder = runs[run]
    before = tree_state(folder)
    argv = ["train", "--data", "fashion-mnist", "--data-dir", str(runs["data"]), "--storage", str(folder.parent),
            "--run-name", folder.name, "--epochs", "2", "--batch-size", "32", *flags]  # fmt: skip
    line = refused(argv, "--conditional", capsys)
    assert "cannot resume" in line and "new --run-name" in line
    assert tree_state(folder) == before


@pytest.fixture
def first_scheme_run(runs, tmp_path) -> Path:
    """A run whose checkpoint is of the first conditional scheme: G with a label embedding joined to its noise."""
    state = newest_checkpoint(runs["conditional"])
    state["generator"] = {**state["generator"], "label_embedding.weight": torch.zeros(NUM_CLASSES, NUM_CLASSES)}
    run = tmp_path / "runs" / "old"
    write_checkpoint(run / "checkpoint_2026-11-29_12-00-00.000000", state)
    return run


@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "promote"])
def test_a_checkpoint_of_the_first_conditional_scheme_is_refused_in_one_line(
    runs, first_scheme_run, tmp_path, command, capsys
):
    before = tree_state(first_scheme_run)
    argv = {
        "train": ["train", "--conditional", "--data", "fashion-mnist", "--data-dir", str(runs["data"]), "--storage",
                  str(first_scheme_run.parent), "--run-name", "old", "--epochs", "2", "--batch-size", "32"],
        "generate": ["generate", "--from", str(first_scheme_run), "--per-class", "--out", str(tmp_path / "grid.png")],
        "evaluate": ["evaluate", "--from", str(first_scheme_run), "--data-dir", str(runs["data"])],
        "promote": ["promote", "--run", str(first_scheme_run), "--target", str(tmp_path / "job" / "LATEST"),
                    "--data-dir", str(runs["data"])],
    }[command]  # fmt: skip
    line = refused(argv, "first conditional scheme", capsys)
    assert "--conditional" in line and "new --run-name" in line
    assert (
        tree_state(first_scheme_run) == before
        and not (tmp_path / "grid.png").exists()
        and not (tmp_path / "job").exists()
    )


# promote -------------------------------------------------------------------------------------


@pytest.mark.parametrize("candidate, current", [("conditional", "plain"), ("plain", "conditional")])
@pytest.mark.parametrize("recorded", [True, False], ids=["pointer records its kind", "older pointer"])
def test_promoting_a_run_of_the_other_kind_over_latest_is_refused(runs, tmp_path, capsys, candidate, current, recorded):
    target = runs["data"].parent / f"job-{tmp_path.name}" / "LATEST"  # in the runs' storage, one job per test
    target.parent.mkdir()
    pointer = {"run": str(runs[current]), "fid_classifier": 1.0, "promoted_at": "2026-01-01T00:00:00+00:00"}
    if recorded:
        pointer.update(conditional=current == "conditional", num_classes=NUM_CLASSES if current == "conditional" else 0)
    target.write_text(json.dumps(pointer) + "\n")
    before = tree_state(target.parent), tree_state(runs[candidate])
    line = refused(
        ["promote", "--run", str(runs[candidate]), "--target", str(target), "--data-dir", str(runs["data"])],
        "--target",
        capsys,
    )
    assert "--conditional" in line and "--run" in line
    assert (tree_state(target.parent), tree_state(runs[candidate])) == before
