"""Independent quality evaluator for generated Fashion-MNIST images (TensorFlow/Keras + numpy only).

Judges generated images from any source (gan-job's PyTorch generator, the TF
tutorial's generator from ``tf_tutorial_train.py``, ...) with a yardstick that
is NOT part of gan-job: it imports nothing from the project and uses its own
classifier of a different architecture, the classic Keras MNIST CNN

    Conv2D(32, 3, relu) - Conv2D(64, 3, relu) - MaxPool(2) - Dropout(0.25)
    - Flatten - Dense(128, relu) [features] - Dropout(0.5) - Dense(10)

(gan-job's own classifier is Conv(16)-BN-Pool-Conv(32)-BN-Pool-Dense(128)),
trained with Adam(1e-3), batch 128, on the real training split scaled to
[-1, 1] with a fixed seed. Its weights are cached in ``--cache`` (with a
``.json`` sidecar describing how they were trained), so it trains once; a cache
trained with other settings is retrained.

For every ``.npy`` file given (float32 images in [-1, 1], shape (N, 28, 28),
(N, 1, 28, 28) or (N, 28, 28, 1)) it prints one JSON line with:

* ``fid``: the Fréchet distance between the generated images and the first N
  real TEST images in the classifier's 128-d feature space (N at most 10000;
  more generated images are cut to the first 10000);
* ``fid_floor``: the same for the first N real TRAIN images vs those TEST images
  (what a perfect generator of training-like images would score at this N);
* ``class_histogram`` (counts of the classifier's predicted labels),
  ``modes_covered`` (classes with >= 2 % of them), ``kl_to_uniform`` (KL of the
  predicted-label distribution to uniform, natural log);
* ``accuracy_of_classifier`` (on the full real test split).

``--real-check`` adds one line for real data only: test half vs test half,
train vs test at 5000 images, and the label statistics of the real test split.

The matrix square root is ``scipy.linalg.sqrtm`` when scipy is installed,
otherwise the trace of sqrt(S1 S2) is taken from the eigenvalues of the
symmetric product sqrt(S1) S2 sqrt(S1) (``sqrtm_method`` says which).

Run it from the scratch TF venv:

    /tmp/tfvenv/bin/python benchmarks/independent_eval.py --real-check /tmp/tf_dcgan/tf_epoch_*.npy
"""

import argparse
import gzip
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_CACHE = "/tmp/independent_eval_classifier.keras"
NUM_CLASSES = 10
MODE_THRESHOLD = 0.02
TRAIN_BATCH = 128
LEARNING_RATE = 1e-3
PREDICT_BATCH = 1000
ARCHITECTURE = "keras-mnist-cnn: C32k3-C64k3-MP2-D.25-F-D128-D.5-D10"

try:
    import scipy.linalg

    HAVE_SCIPY = True
except ImportError:  # pragma: no cover - depends on the venv
    HAVE_SCIPY = False


# ---------------------------------------------------------------- data


def _read_idx(path, magic_expected):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int(np.frombuffer(data, dtype=">u4", count=1)[0])
    if magic != magic_expected:
        raise ValueError(f"{path}: magic {magic}, expected {magic_expected}")
    ndim = magic & 0xFF
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {tuple(dims)} values, found {values.size}")
    return values.reshape(tuple(dims))


def load_split(data_dir, split):
    """Images as float32 (N, 28, 28, 1) in [-1, 1] and labels int64 (N,)."""
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(Path(data_dir) / f"{prefix}-images-idx3-ubyte.gz", 2051)
    labels = _read_idx(Path(data_dir) / f"{prefix}-labels-idx1-ubyte.gz", 2049)
    images = ((images.astype(np.float32) - 127.5) / 127.5)[..., None]
    return images, labels.astype(np.int64)


def load_generated(path):
    """A .npy of generated images → float32 (N, 28, 28, 1), with a note if the range looks wrong."""
    array = np.load(path)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise ValueError(f"{path}: expected (N, 28, 28), (N, 1, 28, 28) or (N, 28, 28, 1), got {array.shape}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{path}: non-finite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < -1.001 or hi > 1.001:
        print(f"warning: {path}: values in [{lo:.3f}, {hi:.3f}], outside [-1, 1]", file=sys.stderr)
    elif lo >= 0.0 and hi > 0.5:
        print(f"warning: {path}: values in [{lo:.3f}, {hi:.3f}] look like [0, 1], not [-1, 1]", file=sys.stderr)
    return array[..., None], (lo, hi)


# ---------------------------------------------------------------- classifier


def build_classifier():
    import keras
    from keras import layers

    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu", name="features")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, outputs, name="independent_fashion_cnn")


def load_or_train_classifier(cache, epochs, limit, seed, train_images, train_labels):
    """The cached classifier if it was trained with these settings, else a freshly trained one."""
    import keras

    wanted = {
        "architecture": ARCHITECTURE,
        "epochs": epochs,
        "limit": limit,
        "seed": seed,
        "batch_size": TRAIN_BATCH,
        "learning_rate": LEARNING_RATE,
    }
    cache = Path(cache)
    meta_path = cache.with_name(cache.name + ".json")
    if cache.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            model = keras.models.load_model(cache, compile=False)
            return model, dict(meta, cached=True)
        print(f"note: {cache} was trained with other settings; retraining", file=sys.stderr)

    keras.utils.set_random_seed(seed)
    model = build_classifier()
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = train_images[:limit], train_labels[:limit]
    print(f"training the independent classifier: {len(x)} images, {epochs} epochs", file=sys.stderr)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.fit(x, y, batch_size=TRAIN_BATCH, epochs=epochs, shuffle=True, verbose=2)
    meta = dict(
        wanted,
        train_seconds=round(time.perf_counter() - start, 1),
        train_cpu_seconds=round(time.process_time() - cpu_start, 1),
        keras_version=keras.__version__,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.keras")
    model.save(tmp)
    os.replace(tmp, cache)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return model, dict(meta, cached=False)


class Evaluator:
    def __init__(self, model, test_images, test_labels, train_images):
        import keras

        self.feature_model = keras.Model(model.inputs, [model.get_layer("features").output, model.outputs[0]])
        self.test_images, self.train_images = test_images, train_images
        self._stats = {}  # (name, n) -> (mu, sigma)
        feats, logits = self.run(test_images)
        self._test_feats = feats
        self.accuracy = float(np.mean(np.argmax(logits, axis=1) == test_labels))
        self.test_predictions = np.argmax(logits, axis=1)

    def run(self, images):
        feats, logits = self.feature_model.predict(images, batch_size=PREDICT_BATCH, verbose=0)
        return feats.astype(np.float64), logits

    def real_stats(self, name, n):
        key = (name, n)
        if key not in self._stats:
            if name == "test":
                feats = self._test_feats[:n]
            else:
                feats = self.run(self.train_images[:n])[0]
            self._stats[key] = gaussian(feats)
        return self._stats[key]


# ---------------------------------------------------------------- statistics


def gaussian(features):
    return features.mean(axis=0), np.cov(features, rowvar=False)


def trace_sqrt_product(sigma1, sigma2):
    """Tr(sqrt(S1 S2)) and the method used."""
    if HAVE_SCIPY:
        # Dead ReLU units make the covariances singular; sqrtm copes (and says so), as in pytorch-fid.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
            if isinstance(covmean, tuple):  # older SciPy with disp=False semantics
                covmean = covmean[0]
            if not np.all(np.isfinite(covmean)):
                offset = np.eye(sigma1.shape[0]) * 1e-6
                covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        return float(np.real(np.trace(covmean))), "scipy.linalg.sqrtm"
    # sqrt(S1 S2) is similar to the symmetric PSD sqrt(S1) S2 sqrt(S1)'s square root: same trace.
    w, v = np.linalg.eigh(sigma1)
    sqrt1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    product = sqrt1 @ sigma2 @ sqrt1
    eig = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sum(np.sqrt(np.clip(eig, 0, None)))), "eigh-symmetric-product"


def frechet_distance(stats1, stats2):
    (mu1, s1), (mu2, s2) = stats1, stats2
    tr_covmean, method = trace_sqrt_product(s1, s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean), method


def label_stats(predictions):
    counts = np.bincount(predictions, minlength=NUM_CLASSES)
    p = counts / counts.sum()
    nz = p > 0
    kl = float(np.sum(p[nz] * np.log(p[nz] * NUM_CLASSES)))
    return {
        "modes_covered": int(np.sum(p >= MODE_THRESHOLD)),
        "class_histogram": counts.astype(int).tolist(),
        "kl_to_uniform": round(kl, 5),
    }


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help=".npy files of generated images in [-1, 1]")
    parser.add_argument("--real-check", action="store_true", help="also report real-vs-real distances (the floor)")
    parser.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help=f"Fashion-MNIST IDX folder (default {DEFAULT_DATA_DIR})"
    )
    parser.add_argument(
        "--cache", default=DEFAULT_CACHE, help=f"classifier weights file, .keras (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--classifier-epochs", type=int, default=3, help="classifier training epochs (default 3)")
    parser.add_argument(
        "--classifier-limit",
        type=int,
        default=60000,
        help="train the classifier on the first N training images (default 60000, all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="classifier training seed (default 0)")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra- and inter-op threads (default: TensorFlow decides)"
    )
    args = parser.parse_args()
    if not args.files and not args.real_check:
        parser.error("give .npy files and/or --real-check")
    if args.classifier_epochs < 1 or not 1 <= args.classifier_limit <= 60000:
        parser.error("--classifier-epochs must be >= 1 and --classifier-limit in 1..60000")
    if not args.cache.endswith(".keras"):
        parser.error("--cache must end in .keras")

    import tensorflow as tf

    if args.threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    train_images, train_labels = load_split(args.data_dir, "train")
    test_images, test_labels = load_split(args.data_dir, "test")
    model, meta = load_or_train_classifier(
        args.cache, args.classifier_epochs, args.classifier_limit, args.seed, train_images, train_labels
    )
    evaluator = Evaluator(model, test_images, test_labels, train_images)
    classifier = {
        "architecture": ARCHITECTURE,
        "epochs": meta["epochs"],
        "limit": meta["limit"],
        "seed": meta["seed"],
        "cached": meta["cached"],
        "train_seconds": meta.get("train_seconds"),
        "train_cpu_seconds": meta.get("train_cpu_seconds"),
        "cache": args.cache,
    }
    accuracy = round(evaluator.accuracy, 4)
    print(json.dumps({"classifier": classifier, "accuracy_of_classifier": accuracy}), flush=True)

    if args.real_check:
        half = len(test_images) // 2
        test_a, test_b = gaussian(evaluator._test_feats[:half]), gaussian(evaluator._test_feats[half:])
        fid_halves, method = frechet_distance(test_a, test_b)
        fid_train_test, _ = frechet_distance(evaluator.real_stats("train", half), evaluator.real_stats("test", half))
        fid_train_test_full, _ = frechet_distance(
            evaluator.real_stats("train", len(test_images)), evaluator.real_stats("test", len(test_images))
        )
        print(
            json.dumps(
                dict(
                    {
                        "file": "real-check",
                        "n": half,
                        "fid_test_half_vs_test_half": round(fid_halves, 4),
                        "fid_train_vs_test": round(fid_train_test, 4),
                        "fid_train_vs_test_10000": round(fid_train_test_full, 4),
                    },
                    **label_stats(evaluator.test_predictions),
                    accuracy_of_classifier=accuracy,
                    sqrtm_method=method,
                )
            ),
            flush=True,
        )

    for path in args.files:
        images, (lo, hi) = load_generated(path)
        if len(images) > len(test_images):
            print(f"note: {path}: using the first {len(test_images)} of {len(images)} images", file=sys.stderr)
            images = images[: len(test_images)]
        n = len(images)
        if n < 2:
            raise SystemExit(f"{path}: need at least 2 images")
        feats, logits = evaluator.run(images)
        fid, method = frechet_distance(gaussian(feats), evaluator.real_stats("test", n))
        fid_floor, _ = frechet_distance(evaluator.real_stats("train", n), evaluator.real_stats("test", n))
        print(
            json.dumps(
                dict(
                    {"file": str(path), "n": n, "fid": round(fid, 4), "fid_floor": round(fid_floor, 4)},
                    **label_stats(np.argmax(logits, axis=1)),
                    accuracy_of_classifier=accuracy,
                    sqrtm_method=method,
                    value_range=[round(lo, 4), round(hi, 4)],
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
