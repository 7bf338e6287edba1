"""The `evaluate` command: one JSON object of metrics from a run or checkpoint, with bad input refused."""

import argparse
import json
import pickle
import shutil

import pytest
import torch

from gan.classifier import DEFAULT_EPOCHS, cache_path, load_or_train_classifier
from gan.data import load_split
from gan.models import Generator
from job.storage.checkpoint import checkpoint_folders, load_from, write_checkpoint
from job.config import TrainConfig
from job.errors import UsageError
from job.commands.evaluate import add_evaluate_arguments
from job.runtime.local_session import LocalSession
from job.storage.location import resolve_location
from job.runtime.loop import run_worker



@pytest.fixture(scope="session")
def trained_classifier_file(small_fashion_dir, tmp_path_factory):
    """The classifier `evaluate` would train on the small data, trained once for the session."""
    train_set = load_split(small_fashion_dir, "train")
    cache = tmp_path_factory.mktemp("classifier-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        load_or_train_classifier("fashion-mnist", train_set.images, train_set.labels, train_set.fingerprint, epochs=DEFAULT_EPOCHS)
        path = cache_path("fashion-mnist", train_set.fingerprint, 0)
    return path, path.relative_to(cache)


@pytest.fixture
def cached_classifier(trained_classifier_file, isolated_home):
    """Put the session's classifier into this test's empty cache, where `evaluate` looks first."""
    source, relative = trained_classifier_file
    target = isolated_home / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return target


def evaluate_main(argv):
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(argv)
    return args.handler(args)


def train_tiny_run(tmp_path, data_dir, **overrides):
    values = {
        "data": "fashion-mnist", "data_dir": str(data_dir), "epochs": 1, "batch_size": 32, "limit": 64,
        "storage": str(tmp_path / "runs"), "run_name": "r1", "cpus_per_worker": 1,
        "eval_every": 0,  # no training-time metrics, which these tests do not need (from_dict drops it if unknown)
    }  # fmt: skip
    config = TrainConfig.from_dict({**values, **overrides})
    run = resolve_location(config.storage).child(config.run_name)
    run_worker(config, LocalSession(run, torch.device("cpu")))
    return run


@pytest.fixture
def quiet_run(tmp_path, small_fashion_dir, capsys):
    """A one-epoch run on the small data; its training output is cleared from the captured streams."""
    run = train_tiny_run(tmp_path, small_fashion_dir)
    capsys.readouterr()
    return run


def test_evaluating_a_run_prints_one_json_object_and_stores_it_with_the_classifier(
    tmp_path, small_fashion_dir, cached_classifier, quiet_run, capsys
):
    run = quiet_run
    assert evaluate_main(["--from", run.uri, "--data", "fashion-mnist", "--data-dir", str(small_fashion_dir), "--num", "200"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {
        "fid_classifier",
        "fid_classifier_floor",
        "class_histogram",
        "modes_covered",
        "kl_to_uniform",
        "precision",
        "recall",
        "inception_fid",
    } <= set(result)
    assert result["epoch"] == 1 and result["num_images"] == 200 and result["data"] == "fashion-mnist"
    assert result["source"] == checkpoint_folders(run)[0].uri and result["generator"] == "generator"
    assert len(result["class_histogram"]) == 10 and sum(result["class_histogram"]) == pytest.approx(1, abs=1e-3)
    assert result["inception_fid"]["computed"] is False
    artifacts = tmp_path / "runs" / "r1" / "artifacts"
    assert json.loads((artifacts / "eval.json").read_text()) == result
    assert (artifacts / "classifier.pt").read_bytes() == cached_classifier.read_bytes()


def test_evaluating_a_checkpoint_folder_writes_nothing_and_defaults_to_the_runs_data(
    tmp_path, small_fashion_dir, cached_classifier, quiet_run, capsys
):
    checkpoint = checkpoint_folders(quiet_run)[0]
    assert evaluate_main(["--from", checkpoint.uri, "--data-dir", str(small_fashion_dir), "--num", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == "fashion-mnist"
    assert not (tmp_path / "runs" / "r1" / "artifacts" / "eval.json").exists()


def test_the_ema_generator_is_evaluated_when_the_checkpoint_has_one(tmp_path, small_fashion_dir, cached_classifier, quiet_run, capsys):
    folder = checkpoint_folders(quiet_run)[0]
    _, state = load_from(folder.uri)
    constant = Generator(state["config"]["noise_dim"])
    torch.nn.init.zeros_(constant.upsample[-2].weight)  # tanh(0): every image the same flat grey
    state["ema_generator"] = constant.state_dict()
    write_checkpoint(tmp_path / "ema", state)
    assert evaluate_main(["--from", str(tmp_path / "ema"), "--data-dir", str(small_fashion_dir), "--num", "50"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generator"] == "ema_generator"
    assert result["modes_covered"] == 1 and result["recall"] == 0.0


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"num": 0}, "--num"),
        ({"source": "MISSING"}, "--from"),
        ({"data": "cifar"}, "--data"),
        ({"inception_weights": "MISSING.pth"}, "--inception-weights"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_bad_input_is_refused_naming_the_flag(tmp_path, change, flag):
    from job.commands.evaluate import evaluate

    values = {
        "source": str(tmp_path),
        "data": "fashion-mnist",
        "data_dir": None,
        "num": 10,
        "seed": 0,
        "inception_weights": None,
        "s3_endpoint": None,
    }
    values.update({k: str(tmp_path / v) if v in ("MISSING", "MISSING.pth") else v for k, v in change.items()})
    with pytest.raises(UsageError, match=flag):
        evaluate(argparse.Namespace(**values))


def test_a_pickled_inception_weights_file_is_refused_before_anything_loads_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights = tmp_path / "inception.pth"
    weights.write_bytes(pickle.dumps({"fc.weight": Payload()}, protocol=2))
    with pytest.raises(UsageError, match="--inception-weights .* not a plain state dict"):
        evaluate_main(["--from", str(tmp_path), "--inception-weights", str(weights)])
    assert not marker.exists()
