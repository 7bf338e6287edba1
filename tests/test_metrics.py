"""Quality metrics on known cases: real vs real, real vs noise, one-image generators, k-NN precision/recall."""

import io
import json
import math
import pickle

import pytest
import torch

from gan.classifier import (
    PRETEXT_ROTATION,
    Classifier,
    FeatureExtractor,
    TrainedClassifier,
    accuracy,
    cache_path,
    classifier_from_bytes,
    classifier_to_bytes,
    load_or_train_classifier,
    rotation_accuracy,
    stage_widths,
    train_classifier,
    weights_digest,
    with_rotations,
)
from gan.data import ImageSet, load_split, to_uint8, to_unit_range
from gan.metrics import (
    QualityEvaluator,
    build_evaluator,
    class_histogram,
    fid_classifier,
    inception_fid,
    kl_to_uniform,
    modes_covered,
    precision_recall,
    torch_fidelity_missing_reason,
)

NUM_TRAIN = 5000  # enough for a usable feature space in one epoch (~80 % accuracy), a few seconds on a CPU
NUM_TEST = 2000


@pytest.fixture(scope="session")
def fashion(fashion_mnist_dir):
    return load_split(fashion_mnist_dir, "train", NUM_TRAIN), load_split(fashion_mnist_dir, "test", NUM_TEST)


@pytest.fixture(scope="session")
def evaluator(fashion):
    train_set, test_set = fashion
    model = train_classifier(train_set.images, train_set.labels, seed=0, epochs=1)
    trained = TrainedClassifier(model, weights_digest(model), train_set.fingerprint, 0, 1, None)
    return QualityEvaluator(
        trained,
        to_unit_range(test_set.images),
        to_unit_range(train_set.images),
        seed=0,
        test_fingerprint=test_set.fingerprint,
    )


def _noise(count: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_classifier_learns_fashion_mnist_from_a_small_subset(evaluator, fashion):
    _, test_set = fashion
    assert accuracy(evaluator.model, test_set.images, test_set.labels) > 0.75


def test_fid_of_two_real_halves_is_small_and_of_noise_is_large(evaluator):
    real = evaluator.real_test
    real_vs_real = fid_classifier(evaluator.extractor, real[:1000], real[1000:])
    real_vs_noise = fid_classifier(evaluator.extractor, _noise(1000), real[1000:])
    assert real_vs_real < 5
    assert real_vs_noise > 50 * real_vs_real


def test_the_fid_floor_of_real_training_images_is_close_to_zero_and_below_a_bad_generator(evaluator):
    metrics = evaluator.compute(_noise(1000))
    assert metrics["fid_classifier_floor"] < 5 < metrics["fid_classifier"]


def test_a_generator_of_one_image_covers_one_class_with_kl_near_ln_10(evaluator):
    one_image = evaluator.real_train[:1].expand(500, -1, -1, -1).clone()
    metrics = evaluator.compute(one_image)
    assert metrics["modes_covered"] == 1
    assert max(metrics["class_histogram"]) == 1.0
    assert metrics["kl_to_uniform"] == pytest.approx(math.log(10), abs=1e-3)
    assert metrics["recall"] < 0.05  # one image covers almost none of the real variety


def test_real_images_cover_all_classes_with_kl_near_zero(evaluator):
    metrics = evaluator.compute(evaluator.real_train[:1000])
    assert metrics["modes_covered"] == 10 and metrics["kl_to_uniform"] < 0.1


def test_kl_to_uniform_and_modes_on_known_histograms():
    assert kl_to_uniform([0.1] * 10) == pytest.approx(0.0, abs=1e-6)
    assert kl_to_uniform([0.5, 0.5] + [0.0] * 8) == pytest.approx(math.log(5))
    assert modes_covered([0.019, 0.981] + [0.0] * 8) == 1 and modes_covered([0.02, 0.98] + [0.0] * 8) == 2
    logits = torch.eye(10)[[3, 3, 3, 7]]
    assert class_histogram(logits) == [0, 0, 0, 0.75, 0, 0, 0, 0.25, 0, 0]


def test_precision_and_recall_are_one_for_identical_sets_and_zero_for_distant_ones():
    points = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(points, points.clone()) == (1.0, 1.0)
    assert precision_recall(points, points + 100.0) == (0.0, 0.0)


def test_precision_recall_separate_quality_from_coverage():
    real = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    half_of_real = real[real[:, 0] > 0]  # realistic but covering only half
    precision, recall = precision_recall(real, half_of_real, rows=64)  # small blocks: the chunked path
    assert precision == 1.0 and 0.3 < recall < 0.8


def test_compute_gives_plain_json_values_and_the_same_numbers_twice(evaluator):
    images = _noise(200, seed=5)
    first, second = evaluator.compute(images), evaluator.compute(images)
    assert first == second
    assert json.loads(json.dumps(first)) == first
    assert set(first) == {
        "fid_classifier",
        "fid_classifier_floor",
        "class_histogram",
        "modes_covered",
        "kl_to_uniform",
        "precision",
        "recall",
    }


def test_the_feature_module_stays_in_inference_mode_and_declares_its_width(evaluator):
    extractor = FeatureExtractor(evaluator.model).train()
    assert not extractor.training and not evaluator.model.training
    assert extractor.num_features == extractor(evaluator.real_test[:2]).shape[1]


def test_training_is_deterministic_from_the_seed_and_leaves_the_global_rng_and_threads_alone(fashion):
    train_set, _ = fashion
    images, labels = train_set.images[:300], train_set.labels[:300]
    torch.manual_seed(123)
    before, threads = torch.get_rng_state(), torch.get_num_threads()
    first = train_classifier(images, labels, seed=7, epochs=1)
    assert torch.equal(torch.get_rng_state(), before) and torch.get_num_threads() == threads
    assert weights_digest(first) == weights_digest(train_classifier(images, labels, seed=7, epochs=1))
    assert weights_digest(first) != weights_digest(train_classifier(images, labels, seed=8, epochs=1))


def test_the_classifier_is_trained_once_and_then_read_from_the_cache(fashion, monkeypatch):
    train_set, _ = fashion
    images, labels = train_set.images[:300], train_set.labels[:300]
    trained = load_or_train_classifier("fashion-mnist", images, labels, "300:abc", seed=0, epochs=1)
    assert cache_path("fashion-mnist", "300:abc", 0).is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr("gan.classifier.train_classifier", no_training)
    again = load_or_train_classifier("fashion-mnist", images, labels, "300:abc", seed=0, epochs=1)
    assert again.digest == trained.digest


def test_a_damaged_cache_file_is_replaced_by_a_trained_classifier(fashion):
    train_set, _ = fashion
    path = cache_path("fashion-mnist", "300:abc", 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    trained = load_or_train_classifier(
        "fashion-mnist", train_set.images[:300], train_set.labels[:300], "300:abc", seed=0, epochs=1
    )
    assert classifier_from_bytes(path.read_bytes()).digest == trained.digest


def test_inception_fid_is_not_computed_without_weights_and_says_why(evaluator):
    result = inception_fid(_noise(4), evaluator.real_test[:4], None)
    assert result["computed"] is False and "--inception-weights" in result["reason"]


def test_a_missing_torch_fidelity_is_reported_with_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    weights = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    assert "pip install torch-fidelity" in torch_fidelity_missing_reason()
    result = inception_fid(_noise(4), _noise(4, seed=2), weights)
    assert result == {"computed": False, "reason": torch_fidelity_missing_reason()}


# The user's Inception weights are untrusted input: read once, weights only (issue 28) ----------


class _Payload:
    """Unpickling this runs code: it writes "executed" into `marker`."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('executed')",))


def _payload_file(path, marker, kind: str) -> None:
    if kind == "plain pickle":
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    else:  # torch.save's zip format, shaped like a state dict, the payload where a weight goes
        torch.save({"fc.weight": _Payload(marker), "fc.bias": torch.zeros(3)}, path)


@pytest.fixture
def torch_fidelity_like(monkeypatch) -> list[dict]:
    """`inception_fid` as with torch-fidelity installed, but for the network; the state dicts its FID was given."""
    built: list[dict] = []

    class TorchFidelityLike:
        """torchmetrics' FID as torch-fidelity 0.4 builds it, but for the network: its FeatureExtractorInceptionV3
        reads the weights it is handed with `torch.load(path, weights_only=False)`."""

        def __init__(self, feature: int, feature_extractor_weights_path, sync_on_compute: bool) -> None:
            built.append(torch.load(feature_extractor_weights_path, weights_only=False))

        def update(self, imgs: torch.Tensor, real: bool) -> None:
            pass

        def compute(self) -> torch.Tensor:
            return torch.tensor(1.5)

    monkeypatch.setattr("gan.metrics.torch_fidelity_missing_reason", lambda: None)
    monkeypatch.setattr("torchmetrics.image.fid.FrechetInceptionDistance", TorchFidelityLike)
    return built


@pytest.mark.parametrize("kind", ["plain pickle", "torch.save zip"])
def test_inception_weights_holding_a_pickle_payload_are_refused_and_never_run(torch_fidelity_like, tmp_path, kind):
    marker, weights = tmp_path / "executed", tmp_path / "inception.pth"
    _payload_file(weights, marker, kind)
    with pytest.raises(ValueError, match="not a plain state dict"):
        inception_fid(_noise(4), _noise(4, seed=2), weights)
    assert not marker.exists() and torch_fidelity_like == []


def test_inception_weights_reach_the_extractor_only_through_one_weights_only_read(
    torch_fidelity_like, monkeypatch, tmp_path
):
    """The file is swapped for a payload right after its weights-only read (as by a writer racing the reader):
    the extractor gets the tensors of that read, re-serialized here, and never the path, which torch-fidelity
    would load with weights_only=False."""
    marker, weights = tmp_path / "executed", tmp_path / "inception.pth"
    state = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.nn.Parameter(torch.randn(3))}
    torch.save(state, weights)
    reads: list[bool | None] = []
    real_load = torch.load

    def load_then_swap(file, *args, **kwargs):
        if str(file) != str(weights):
            return real_load(file, *args, **kwargs)
        reads.append(kwargs.get("weights_only"))
        try:
            return real_load(file, *args, **kwargs)
        finally:
            _payload_file(weights, marker, "plain pickle")

    monkeypatch.setattr(torch, "load", load_then_swap)
    result = inception_fid(_noise(4), _noise(4, seed=2), weights)
    assert not marker.exists()
    assert reads == [True]  # the user's file: read once, weights only
    assert result == {"computed": True, "value": 1.5, "num_real": 4}
    (handed,) = torch_fidelity_like
    assert handed.keys() == state.keys() and all(torch.equal(handed[key], state[key]) for key in state)
    assert all(type(tensor) is torch.Tensor for tensor in handed.values())  # plain tensors, no Parameter


def _random_inception_state_dict(monkeypatch) -> dict[str, torch.Tensor]:
    """A state dict with the keys and shapes of torch-fidelity's Inception v3, randomly initialized (nothing is
    downloaded: its loading is switched off while it is built)."""
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        return inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()


def test_real_inception_weights_load_through_the_weights_only_path(monkeypatch, tmp_path):
    """With torch-fidelity installed: a state dict of the right keys gives a finite FID, the network holds exactly
    its tensors, and the file is read once, weights only."""
    state = _random_inception_state_dict(monkeypatch)
    weights = tmp_path / "inception.pth"
    torch.save(state, weights)
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    built, reads, real_load = [], [], torch.load

    class Kept(fid_module.FrechetInceptionDistance):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    def recorded(file, *args, **kwargs):
        if str(file) == str(weights):
            reads.append(kwargs.get("weights_only"))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(fid_module, "FrechetInceptionDistance", Kept)
    monkeypatch.setattr(torch, "load", recorded)
    result = inception_fid(_noise(2), _noise(2, seed=2), weights)  # FID's least: 2 a side, each 299x299 in Inception
    assert result["computed"] is True and math.isfinite(result["value"]), result
    assert reads == [True]
    loaded = built[0].inception.state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_a_state_dict_that_is_not_inception_is_reported_not_computed(monkeypatch, tmp_path):
    pytest.importorskip("torch_fidelity")
    weights = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    result = inception_fid(_noise(2), _noise(2, seed=2), weights)
    assert result["computed"] is False and "not torch-fidelity's Inception v3 state dict" in result["reason"]
    assert "\n" not in result["reason"]


# Users' own images (#30): other shapes, and unlabelled data measured through the rotation task ----------

# weights_digest(Classifier()) right after torch.manual_seed(0), computed with the code before other shapes
# existed (commit aa2a7c0): the same network, built from the same draws.
TUTORIAL_CLASSIFIER_INITIAL_DIGEST = "79777b59dc7f10bd"
CLASS_METRICS = ("class_histogram", "modes_covered", "kl_to_uniform")


def test_the_28x28x1_classifier_and_its_cache_name_are_those_of_before_other_shapes():
    torch.manual_seed(0)
    assert weights_digest(Classifier()) == TUTORIAL_CLASSIFIER_INITIAL_DIGEST
    torch.manual_seed(0)
    assert weights_digest(Classifier(10, resolution=28, channels=1)) == TUTORIAL_CLASSIFIER_INITIAL_DIGEST
    assert cache_path("fashion-mnist", "60000:abc", 0).name == "fashion-mnist-60000-abc-seed0.pt"
    assert cache_path("own", "9:abc", 1, 32, 3).name == "own-9-abc-32x32x3-seed1.pt"
    assert cache_path("own", "9:abc", 1, 28, 1, PRETEXT_ROTATION).name == "own-9-abc-28x28x1-rot-seed1.pt"


def test_the_classifier_halves_every_shape_to_8x8_or_below_into_128_features():
    assert {r: stage_widths(r) for r in (28, 32, 64, 128)} == {
        28: (16, 32),  # 7x7
        32: (16, 32),
        64: (16, 32, 64),
        128: (16, 32, 64, 64),
    }
    for resolution in (32, 128):
        model = Classifier(5, resolution, channels=3).eval()
        images = torch.zeros(2, 3, resolution, resolution)
        assert model.features(images).shape == (2, 128) and model(images).shape == (2, 5)


def test_a_cache_file_written_before_other_shapes_loads_as_the_28x28x1_classifier_of_ten_labels():
    images, labels = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8), torch.arange(16) % 10
    model = train_classifier(images, labels, seed=0, epochs=1)
    trained = TrainedClassifier(model, weights_digest(model), "16:x", 0, 1, None)
    stored = torch.load(io.BytesIO(classifier_to_bytes(trained)), weights_only=True)
    for key in ("pretext", "num_classes", "resolution", "channels"):  # what such a file lacks
        del stored[key]
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    loaded = classifier_from_bytes(buffer.getvalue())
    assert loaded.digest == trained.digest and loaded.pretext == "labels" and loaded.model.num_classes == 10


def _tiny_set(count: int, channels: int, resolution: int, seed: int, num_classes: int = 0) -> ImageSet:
    """Random images, brighter towards their top so that they have an upright; labels when num_classes > 0."""
    rng = torch.Generator().manual_seed(seed)
    upright = torch.linspace(255, 0, resolution).view(1, 1, resolution, 1)
    noise = torch.rand(count, channels, resolution, resolution, generator=rng) * 100 - 50
    images = (upright + noise).clamp(0, 255).to(torch.uint8)
    labels = torch.arange(count) % num_classes if num_classes else None
    return ImageSet(images, labels, f"{count}:tiny{seed}")


def test_a_labelled_32x32x3_set_gets_finite_metrics_with_its_own_classes():
    train, test = _tiny_set(96, 3, 32, seed=1, num_classes=3), _tiny_set(48, 3, 32, seed=2, num_classes=3)
    evaluator = build_evaluator("own", train, test, num_classes=3, classifier_epochs=1)
    metrics = evaluator.compute(to_unit_range(_tiny_set(24, 3, 32, seed=3).images))
    assert all(math.isfinite(metrics[key]) for key in ("fid_classifier", "fid_classifier_floor", "precision"))
    assert len(metrics["class_histogram"]) == 3 and 1 <= metrics["modes_covered"] <= 3
    assert evaluator.describe()["feature_space"] == "classifier"
    assert evaluator.classifier.describe()["resolution"] == 32 and torch.equal(evaluator.real_test_labels, test.labels)
    assert cache_path("own", train.fingerprint, 0, 32, 3).is_file()


def test_an_unlabelled_set_is_measured_in_the_rotation_task_s_features_without_class_metrics():
    train, test = _tiny_set(96, 3, 32, seed=1), _tiny_set(48, 3, 32, seed=2)
    evaluator = build_evaluator("own", train, test, num_classes=0, classifier_epochs=1)
    metrics = evaluator.compute(to_unit_range(_tiny_set(24, 3, 32, seed=3).images))
    assert all(metrics[key] is None for key in CLASS_METRICS)
    assert all(math.isfinite(metrics[key]) for key in ("fid_classifier", "fid_classifier_floor", "precision", "recall"))
    assert json.loads(json.dumps(metrics)) == metrics
    described = evaluator.describe()
    assert described["feature_space"] == "rotation" and described["classifier"]["pretext"] == PRETEXT_ROTATION
    assert evaluator.real_test_labels is None and evaluator.model.num_classes == 4
    cached = classifier_from_bytes(cache_path("own", train.fingerprint, 0, 32, 3, PRETEXT_ROTATION).read_bytes())
    assert cached.digest == evaluator.classifier.digest and cached.pretext == PRETEXT_ROTATION


def test_the_rotation_task_learns_which_way_is_up_deterministically():
    train, test = _tiny_set(128, 1, 28, seed=4), _tiny_set(64, 1, 28, seed=5)
    model = train_classifier(train.images, None, seed=0, epochs=3)
    assert model.head.out_features == 4 and rotation_accuracy(model, test.images) > 0.9
    assert weights_digest(model) == weights_digest(train_classifier(train.images, None, seed=0, epochs=3))


def test_with_rotations_turns_each_image_by_its_target_quarter_turns():
    images = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    rotated, targets = with_rotations(images)
    assert targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for position, turns in enumerate(targets.tolist()):
        assert torch.equal(rotated[position], torch.rot90(images[position % 2], turns, dims=(1, 2)))


def test_build_evaluator_refuses_a_class_count_for_data_without_labels():
    train, test = _tiny_set(8, 1, 28, seed=1), _tiny_set(8, 1, 28, seed=2)
    with pytest.raises(ValueError, match="has no labels: pass num_classes=0"):
        build_evaluator("own", train, test, num_classes=10)


@pytest.mark.parametrize("channels", [1, 3])
def test_inception_fid_gets_colour_as_it_is_and_grey_as_three_equal_channels(monkeypatch, tmp_path, channels):
    updates: list[torch.Tensor] = []

    class Recording:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def update(self, imgs: torch.Tensor, real: bool) -> None:
            updates.append(imgs)

        def compute(self) -> torch.Tensor:
            return torch.tensor(1.0)

    monkeypatch.setattr("gan.metrics.torch_fidelity_missing_reason", lambda: None)
    monkeypatch.setattr("torchmetrics.image.fid.FrechetInceptionDistance", Recording)
    weights = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    images = torch.rand(2, channels, 32, 32) * 2 - 1
    assert inception_fid(images, images, weights)["computed"] is True
    assert all(update.shape == (2, 3, 32, 32) and update.dtype == torch.uint8 for update in updates)
    expected = to_uint8(images).expand(-1, 3, -1, -1)
    assert all(torch.equal(update, expected) for update in updates)
