"""Quality metrics of generated images, in the feature space of a classifier trained on the real data.

`fid_classifier` and its floor, class coverage, precision/recall (k = 3) and `inception_fid`. Images of any
supported shape (N, C, R, R); unlabelled data are measured in the feature space of a classifier trained on
the rotation task (`gan.classifier`), and have no class metrics. Why: docs/architecture.md#quality-metrics
"""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gan.classifier import (
    DEFAULT_EPOCHS,
    PREDICT_BATCH,
    PRETEXT_LABELS,
    Classifier,
    FeatureExtractor,
    TrainedClassifier,
    load_or_train_classifier,
)
from gan.data import ImageSet, to_uint8, to_unit_range

if TYPE_CHECKING:  # torchmetrics is imported where a metric is built: see `_fid_metric`
    from torchmetrics.image.fid import FrechetInceptionDistance

K_NEAREST = 3  # neighbours that define a sample's k-NN ball (the paper's default)
MODE_SHARE = 0.02  # a class counts as covered when at least this share of the images falls in it
KL_EPSILON = 1e-10  # keeps log() finite for empty classes (their terms are 0 anyway)
CDIST_ROWS = 1024  # rows per distance block: 1024 x 10,000 float32 distances = 40 MB
INCEPTION_BATCH = 64  # images per Inception forward pass (299x299 RGB each)
MIN_IMAGES = K_NEAREST + 1  # k-NN needs k other images; FID's covariance needs 2


def _fid_metric(
    extractor: torch.nn.Module, image_shape: tuple[int, int, int] = (1, 28, 28)
) -> FrechetInceptionDistance:
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute=False: only one rank computes metrics during training, and a sync would wait
    # forever for the others. reset_real_features=False keeps the real statistics across reset().
    # The extractor has `num_features`, so torchmetrics never probes it; should it, normalize=True and
    # input_img_size (C, R, R) make the probe a float image of our shape.
    return FrechetInceptionDistance(
        feature=extractor,
        reset_real_features=False,
        normalize=True,
        input_img_size=image_shape,
        sync_on_compute=False,
    )


def _update_in_chunks(metric: FrechetInceptionDistance, images: torch.Tensor, real: bool, device: torch.device) -> None:
    for chunk in images.split(PREDICT_BATCH):
        metric.update(chunk.to(device), real=real)


@torch.no_grad()
def fid_classifier(extractor: FeatureExtractor, generated: torch.Tensor, real: torch.Tensor) -> float:
    """Fréchet distance between two image sets (float, [-1, 1]) in the classifier's feature space."""
    device = next(extractor.parameters()).device
    metric = _fid_metric(extractor, tuple(real.shape[1:])).to(device)
    _update_in_chunks(metric, real, real=True, device=device)
    _update_in_chunks(metric, generated, real=False, device=device)
    return float(metric.compute())


def class_histogram(logits: torch.Tensor) -> list[float]:
    """The share of images the classifier puts in each class (sums to 1): logits (N, classes)."""
    counts = torch.bincount(logits.argmax(dim=1).cpu(), minlength=logits.shape[1]).double()
    return (counts / counts.sum()).tolist()


def modes_covered(histogram: list[float], min_share: float = MODE_SHARE) -> int:
    """How many classes hold at least `min_share` of the images."""
    return sum(share >= min_share for share in histogram)


def kl_to_uniform(histogram: list[float], epsilon: float = KL_EPSILON) -> float:
    """KL(histogram || uniform) in nats: sum p log((p + eps) · K); 0 when balanced, ln K for one class."""
    return sum(p * math.log((p + epsilon) * len(histogram)) for p in histogram if p > 0)


def knn_radii(features: torch.Tensor, k: int = K_NEAREST, rows: int = CDIST_ROWS) -> torch.Tensor:
    """Each feature vector's distance to its k-th nearest neighbour in the same set (itself excluded)."""
    # The k+1-th smallest distance of a row, because the smallest is the vector's distance to itself
    # (topk is faster than kthvalue on a CPU).
    return torch.cat(
        [torch.cdist(block, features).topk(k + 1, dim=1, largest=False).values[:, k] for block in features.split(rows)]
    )


def precision_recall(
    real: torch.Tensor,  # (N, D) real features
    generated: torch.Tensor,  # (M, D) generated features
    k: int = K_NEAREST,  # neighbours per k-NN ball
    real_radii: torch.Tensor | None = None,  # knn_radii(real, k), when already known; None = computed here
    rows: int = CDIST_ROWS,  # generated rows per distance block, to bound memory at rows x N
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls in feature space."""
    precision, recall = precision_recall_on_device(real, generated, k, real_radii, rows)
    return float(precision), float(recall)


def precision_recall_on_device(
    real: torch.Tensor,
    generated: torch.Tensor,
    k: int = K_NEAREST,
    real_radii: torch.Tensor | None = None,
    rows: int = CDIST_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`precision_recall` as two 0-d float32 tensors on the features' device: nothing waits for them."""
    real_radii = knn_radii(real, k, rows) if real_radii is None else real_radii
    generated_radii = knn_radii(generated, k, rows)
    generated_is_realistic = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)
    real_is_covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    # One pass over generated-vs-real distances serves both directions.
    for start in range(0, generated.shape[0], rows):
        distances = torch.cdist(generated[start : start + rows], real)  # (rows, N)
        generated_is_realistic[start : start + rows] = (distances <= real_radii[None, :]).any(dim=1)
        real_is_covered |= (distances <= generated_radii[start : start + rows, None]).any(dim=0)
    return generated_is_realistic.float().mean(), real_is_covered.float().mean()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain state dict file, read once with `weights_only=True`; ValueError for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except Exception as err:  # damaged or pickled code: either way not a file to unpickle
        raise ValueError(f"{path} is not a plain state dict ({type(err).__name__})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


def check_state_dict_file(path: str | Path) -> None:
    """Raise ValueError unless `path` is a plain tensor state dict (it loads with `weights_only=True`)."""
    load_state_dict_file(path)


def _as_torch_save_bytes(state: dict[str, torch.Tensor]) -> io.BytesIO:
    """`state` re-serialized by us, as plain tensors: the only bytes a library's own unpickling load gets to see."""
    buffer = io.BytesIO()
    # detach: a Parameter comes out a plain Tensor, so the bytes name no class but Tensor's own rebuild
    torch.save({key: value.detach() for key, value in state.items()}, buffer)
    buffer.seek(0)
    return buffer


def torch_fidelity_missing_reason() -> str | None:
    """Why torchmetrics' Inception FID cannot run here, or None when it can."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return (
            "torch-fidelity is not installed; install it with `pip install torch-fidelity` "
            "(or `pip install torchmetrics[image]`)"
        )
    return None


@torch.no_grad()
def inception_fid(generated: torch.Tensor, real: torch.Tensor, weights_path: str | Path | None) -> dict:
    """torchmetrics' Inception FID from a local weights file, or {"computed": False, "reason": ...}.

    Colour images go in as they are, greyscale ones as three equal channels (Inception takes RGB).
    Slow on a CPU: every image is resized to 299x299 (~6 GFLOP each, ~1 min per 1,000 on 2 cores).
    """
    if weights_path is None:
        return {
            "computed": False,
            "reason": "no Inception weights file given (--inception-weights); nothing is downloaded",
        }
    reason = torch_fidelity_missing_reason()
    if reason is not None:
        return {"computed": False, "reason": reason}
    # The user's file is read here, once, weights only. torch-fidelity's extractor reads whatever path it is
    # given with torch.load(weights_only=False) (and downloads when given none): it gets our own torch.save of
    # the tensors just read, which holds nothing but tensors, and never the user's file.
    state = load_state_dict_file(weights_path)
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(
            feature=2048, feature_extractor_weights_path=_as_torch_save_bytes(state), sync_on_compute=False
        )
    except RuntimeError as err:  # load_state_dict's missing or unexpected keys, or shapes that differ
        if "state_dict" not in str(err):  # not the weights' fault: let it show as it is
            raise
        detail = " ".join(str(err).split())[:200]  # one line, however many keys it lists
        return {
            "computed": False,
            "reason": f"{weights_path} is not torch-fidelity's Inception v3 state dict ({detail}); "
            "pass weights-inception-2015-12-05-6726825d.pth",
        }
    for images, is_real in ((real, True), (generated, False)):
        for chunk in images.split(INCEPTION_BATCH):
            metric.update(to_uint8(chunk).expand(-1, 3, -1, -1), real=is_real)  # grey: 3 equal channels; RGB: as is
    return {"computed": True, "value": round(float(metric.compute()), 4), "num_real": int(real.shape[0])}


class QualityEvaluator:
    """The real side of every metric, computed once; `compute(generated)` then costs only the generated side.

    Build one per run (or per `evaluate`) and call `compute` on a fixed set of generated images every
    few epochs. Real subsets are drawn from `seed`, so the same data give the same reference.
    """

    def __init__(
        self,
        classifier: TrainedClassifier,  # feature space, and labels unless it learnt the rotation task
        real_test: torch.Tensor,  # (N, C, R, R) float in [-1, 1]: the reference of FID, precision, recall
        # (M, C, R, R) float in [-1, 1], or uint8 (only the floor's subset is made float: a whole split of
        # 128x128x3 images would take 10 GB as float): where the FID floor's images come from
        real_train: torch.Tensor,
        seed: int = 0,  # draws the real subsets
        device: torch.device | str = "cpu",  # where features and distances are computed
        test_fingerprint: str | None = None,  # of the test images, recorded by `describe`; None = unknown
        real_test_labels: torch.Tensor | None = None,  # (N,) of real_test, for label accuracy and CAS; None = unknown
    ) -> None:
        self.classifier = classifier
        self.real_test_labels = real_test_labels
        self.test_fingerprint = test_fingerprint
        self.device = torch.device(device)
        self.model: Classifier = classifier.model.to(self.device)
        self.extractor = FeatureExtractor(self.model)
        self.real_test = real_test
        self.real_train = real_train
        self.seed = seed
        self.has_classes = classifier.pretext == PRETEXT_LABELS  # a rotation task's four classes are not the data's
        self._fid = _fid_metric(self.extractor, tuple(real_test.shape[1:])).to(self.device)
        self._test_features = self._add_to_fid(real_test, real=True)  # once: reset() keeps the real side
        self._test_order = torch.randperm(real_test.shape[0], generator=torch.Generator().manual_seed(seed))
        self._train_order = torch.randperm(real_train.shape[0], generator=torch.Generator().manual_seed(seed + 1))
        self._floors: dict[int, float] = {}  # FID floor per sample count
        self._real_radii: dict[int, torch.Tensor] = {}  # k-NN radii of the real subset per sample count

    def _add_to_fid(self, images: torch.Tensor, real: bool) -> torch.Tensor:
        """Add `images` to one side of the FID statistics and return their features.

        A hook keeps the features that torchmetrics computes, so each image goes through the
        classifier once for FID, the class histogram and precision/recall together.
        """
        captured: list[torch.Tensor] = []
        hook = self.extractor.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            _update_in_chunks(self._fid, images, real=real, device=self.device)
        finally:
            hook.remove()
        return torch.cat(captured)

    def fid_floor(self, num_images: int) -> float:
        """FID of `num_images` real training images against the test set: the best a generator can expect."""
        count = min(num_images, self.real_train.shape[0])
        if count not in self._floors:
            self._fid.reset()  # drops the generated side only (reset_real_features=False)
            subset = self.real_train[self._train_order[:count]]
            self._add_to_fid(to_unit_range(subset) if subset.dtype == torch.uint8 else subset, real=False)
            self._floors[count] = float(self._fid.compute())
        return self._floors[count]

    def _real_subset(self, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = min(num_images, self.real_test.shape[0])
        features = self._test_features[self._test_order[:count].to(self._test_features.device)]
        if count not in self._real_radii:
            self._real_radii[count] = knn_radii(features)
        return features, self._real_radii[count]

    @torch.no_grad()
    def compute(self, generated: torch.Tensor) -> dict:
        """All classifier metrics of `generated` (N, C, R, R) float in [-1, 1], as plain JSON values.

        The first call for a given N also measures the real side (the floor, the real k-NN radii),
        which later calls reuse. Without classes (unlabelled data) the class metrics are None.
        """
        if generated.shape[0] < MIN_IMAGES:
            raise ValueError(f"metrics need at least {MIN_IMAGES} generated images, got {generated.shape[0]}")
        num_images = int(generated.shape[0])
        floor = self.fid_floor(num_images)  # first: it uses the same generated-side state (cached after the first call)
        self._fid.reset()
        # Everything is queued on the device first; the host waits once, in FID's eigenvalues (torchmetrics), and
        # then reads the rest back in one transfer.
        features = self._add_to_fid(generated, real=False)
        counts = torch.zeros(0, device=features.device, dtype=torch.long)
        if self.has_classes:
            counts = torch.bincount(self.model.head(features).argmax(dim=1), minlength=self.model.num_classes)
        real_features, real_radii = self._real_subset(num_images)
        precision, recall = precision_recall_on_device(real_features, features, real_radii=real_radii)
        fid = self._fid.compute()
        numbers = torch.cat([counts.double(), torch.stack([precision.double(), recall.double(), fid.double()])])
        *counted, precision, recall, fid = numbers.tolist()
        histogram = [count / sum(counted) for count in counted] if self.has_classes else None
        return {
            "fid_classifier": round(fid, 4),
            "fid_classifier_floor": round(floor, 4),
            "class_histogram": [round(share, 4) for share in histogram] if histogram is not None else None,
            "modes_covered": modes_covered(histogram) if histogram is not None else None,
            "kl_to_uniform": round(kl_to_uniform(histogram), 4) if histogram is not None else None,
            "precision": round(precision, 4),
            "recall": round(recall, 4),
        }

    def describe(self) -> dict:
        """What makes two evaluations comparable: the classifier, the reference data and the seed."""
        return {
            "classifier": self.classifier.describe(),
            "feature_space": "classifier" if self.has_classes else "rotation",
            "test_fingerprint": self.test_fingerprint,
            "num_real_test": int(self.real_test.shape[0]),
            "reference_seed": self.seed,
        }


def build_evaluator(
    dataset: str,  # data set name, for the classifier cache
    train: ImageSet,  # the real training split: the classifier's data and the FID floor's images
    test: ImageSet,  # the real test split: the reference of every metric
    num_classes: int,  # classes of the labels; 0 = unlabelled data (the rotation task's feature space)
    seed: int = 0,  # classifier seed and real-subset seed
    device: torch.device | str = "cpu",  # where the metrics are computed
    classifier_epochs: int = DEFAULT_EPOCHS,  # when the classifier has to be trained
) -> QualityEvaluator:
    """A `QualityEvaluator` for one data set's two splits, with the cached (or freshly trained) classifier."""
    if num_classes and (train.labels is None or test.labels is None):
        raise ValueError(f"{dataset} has no labels: pass num_classes=0 (the rotation task) or labelled splits")
    train_labels, test_labels = (train.labels, test.labels) if num_classes else (None, None)
    classifier = load_or_train_classifier(
        dataset,
        train.images,
        train_labels,
        train.fingerprint,
        seed=seed,
        epochs=classifier_epochs,
        test_images_u8=test.images,
        test_labels=test_labels,
        num_classes=num_classes,
    )
    return QualityEvaluator(
        classifier,
        to_unit_range(test.images),
        train.images,  # uint8: the floor draws its images from it
        seed,
        device,
        test_fingerprint=test.fingerprint,
        real_test_labels=test_labels,
    )
