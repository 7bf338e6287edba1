"""The `evaluate` command: one JSON object of metrics from a run or checkpoint, with bad input refused."""

import json
import pickle

import pytest
import torch

import job.commands.evaluate
import job.promotion.evaluation
from gan.classifier import TrainedClassifier
from gan.metrics import MIN_IMAGES
from gan.models import Generator
from job.cli import main
from job.settings import EVAL_NUM
from job.storage.checkpoint import checkpoint_folders, load_from, write_checkpoint
from job.storage.location import resolve_location
from tests.conftest import train_one_process


def evaluate_main(argv):
    """`gan-job evaluate ARGV` through the CLI, as a user runs it."""
    return main(["evaluate", *map(str, argv)])


@pytest.fixture
def quiet_run(tmp_path, small_fashion_dir, capsys):
    """A one-epoch run on the small data; its training output is cleared from the captured streams."""
    run = train_one_process(tmp_path / "runs", small_fashion_dir, "r1", limit=64)
    capsys.readouterr()
    return resolve_location(str(run))


def test_evaluating_a_run_prints_one_json_object_and_stores_it_with_the_classifier(
    tmp_path, small_fashion_dir, cached_classifier, quiet_run, capsys
):
    run = quiet_run
    assert (
        evaluate_main(
            ["--from", run.uri, "--data", "fashion-mnist", "--data-dir", str(small_fashion_dir), "--num", "200"]
        )
        == 0
    )
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


def test_the_ema_generator_is_evaluated_when_the_checkpoint_has_one(
    tmp_path, small_fashion_dir, cached_classifier, quiet_run, capsys
):
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
    "extra, flag",
    [
        (["--num", "0"], "--num"),
        (["--num", str(10**9)], "--num"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**64)], "--seed"),  # torch.manual_seed would raise deep inside
        (["--data", "http://not-s3/images"], "--data"),
        (["--inception-weights", "{tmp}/MISSING.pth"], "--inception-weights"),
    ],
)
def test_bad_input_is_refused_naming_the_flag(tmp_path, extra, flag, capsys):
    assert evaluate_main(["--from", tmp_path, "--data", "fashion-mnist", *[e.format(tmp=tmp_path) for e in extra]]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("gan-job") and flag in line and "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []


def test_the_declared_minimum_image_count_is_what_the_metrics_need():
    assert EVAL_NUM.low == MIN_IMAGES


def test_a_missing_source_is_refused_naming_from(tmp_path, capsys):
    assert evaluate_main(["--from", tmp_path / "MISSING"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--from" in line


def test_a_pickled_inception_weights_file_is_refused_before_anything_loads_it(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights = tmp_path / "inception.pth"
    weights.write_bytes(pickle.dumps({"fc.weight": Payload()}, protocol=2))
    assert evaluate_main(["--from", tmp_path, "--inception-weights", weights]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--inception-weights" in line and "not a plain state dict" in line
    assert not marker.exists()


# A conditional model: label accuracy always, CAS on request (issue 14) -------------------------


@pytest.fixture
def conditional_run(tmp_path, small_fashion_dir, capsys):
    """A one-epoch class-conditional run on the small data; its training output is cleared."""
    run = train_one_process(tmp_path / "runs", small_fashion_dir, "cond", conditional=True, limit=64)
    capsys.readouterr()
    return run


def test_a_conditional_model_is_scored_on_the_labels_it_was_asked_for_next_to_the_real_test_split(
    conditional_run, small_fashion_dir, cached_classifier, capsys
):
    assert evaluate_main(["--from", conditional_run, "--data-dir", small_fashion_dir, "--num", "200"]) == 0
    result = json.loads(capsys.readouterr().out)
    generated, real = result["label_accuracy"]["generated"], result["label_accuracy"]["real_test"]
    assert result["conditional"] is True and "cas" not in result  # CAS only with --cas
    assert len(generated["per_class"]) == 10 and generated["count_per_class"] == [20] * 10  # every class alike
    assert all(0 <= a <= 1 for a in generated["per_class"]) and 0 <= generated["overall"] <= 1
    # the classifier on the real test split: the ceiling
    assert sum(real["count_per_class"]) == 500 and real["overall"] > 0.6
    keys = list(result)
    assert (
        keys.index("inception_fid") < keys.index("label_accuracy") < keys.index("conditional") < keys.index("reference")
    )
    assert json.loads((conditional_run / "artifacts" / "eval.json").read_text()) == result


def test_an_unconditional_model_has_no_label_metrics(quiet_run, small_fashion_dir, cached_classifier, capsys):
    assert evaluate_main(["--from", quiet_run.uri, "--data-dir", small_fashion_dir, "--num", "50"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not {"label_accuracy", "conditional", "cas"} & set(result)


def test_cas_scores_the_conditional_generator_against_the_real_test_split_with_the_evaluation_seed(
    conditional_run, small_fashion_dir, cached_classifier, capsys, monkeypatch
):
    """The wiring of --cas (CAS itself, minutes at its 60,000 images, is tested in test_conditional_metrics.py)."""
    calls = []

    def cas(source, real_classifier, real_test, real_test_labels, **kwargs):
        calls.append((source, real_classifier, real_test, real_test_labels, kwargs))
        return {"generated": {"overall": 0.5}, "real": {"overall": 0.8}}

    monkeypatch.setattr(job.promotion.evaluation, "classification_accuracy_score", cas)
    argv = ["--from", conditional_run, "--data-dir", small_fashion_dir, "--num", "100", "--seed", "7", "--cas"]
    assert evaluate_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cas"] == {"generated": {"overall": 0.5}, "real": {"overall": 0.8}}
    ((source, real_classifier, real_test, real_test_labels, kwargs),) = calls
    assert source.num_classes == 10 and not source.training  # the checkpoint's conditional G, in inference mode
    # the project classifier: CAS's real side
    assert isinstance(real_classifier, TrainedClassifier) and real_classifier.seed == 0
    assert real_test.shape == (500, 1, 28, 28) and real_test_labels.shape == (500,)
    assert kwargs == {"num_classes": 10, "noise_seed": 7}  # the default 60,000 images
    keys = list(result)
    assert keys.index("inception_fid") < keys.index("label_accuracy") < keys.index("cas") < keys.index("reference")


def test_cas_on_an_unconditional_model_is_refused_in_one_line_before_anything_is_built(
    quiet_run, small_fashion_dir, capsys, monkeypatch
):
    def build_nothing(*args):
        raise AssertionError("the evaluator was built for a refused --cas")

    monkeypatch.setattr(job.commands.evaluate, "prepare_evaluator", build_nothing)
    artifacts = quiet_run.child("artifacts")
    before = sorted(artifacts.list_names())
    assert evaluate_main(["--from", quiet_run.uri, "--data-dir", small_fashion_dir, "--cas"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert (
        line.startswith("gan-job") and "--cas" in line and "--conditional" in line and "Traceback" not in captured.err
    )
    assert captured.out == "" and sorted(artifacts.list_names()) == before and not artifacts.child("eval.json").exists()


def test_a_classifier_cache_that_cannot_be_read_fails_in_one_line_and_is_not_trained_again(
    tmp_path, small_fashion_dir, cached_classifier, quiet_run, capsys, monkeypatch
):
    """Only a cache file that is not there (or is damaged) is trained again; one that fails to read (an
    injected EIO: root reads any file here) ends the command, and the cached weights stay as they were."""
    before = cached_classifier.read_bytes()
    real_read_bytes = type(cached_classifier).read_bytes

    def failing(path):
        if path == cached_classifier:
            raise OSError(5, "Input/output error", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(type(cached_classifier), "read_bytes", failing)
    code = evaluate_main(["--from", quiet_run.uri, "--data-dir", small_fashion_dir, "--num", "16"])
    monkeypatch.undo()
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Input/output error" in lines[0] and str(cached_classifier) in lines[0]
    assert cached_classifier.read_bytes() == before
    assert not (tmp_path / "runs" / "r1" / "artifacts" / "eval.json").exists()
