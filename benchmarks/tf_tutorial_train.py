"""Train the TensorFlow DCGAN tutorial's model on Fashion-MNIST, exactly as the tutorial trains it.

A quality baseline for gan-job: the official TensorFlow DCGAN tutorial
(https://www.tensorflow.org/tutorials/generative/dcgan), trained the same way
as gan-job trains (architecture, data, batch size, learning rate), so that its
samples can be judged next to ours by ``benchmarks/independent_eval.py``.

What is the tutorial's, unchanged:

* the models (imported from ``tf_tutorial_step.py``, which reproduces them);
* the data pipeline: ``(x - 127.5) / 127.5`` as float32 of shape (N, 28, 28, 1),
  ``tf.data.Dataset.from_tensor_slices(...).shuffle(BUFFER_SIZE=60000).batch(BATCH_SIZE=256)``
  (the last, partial batch included, with the tutorial's full-size noise batch);
* the losses (``BinaryCrossentropy(from_logits=True)``), ``Adam(1e-4)`` for both
  networks, ``noise_dim = 100`` and the ``train_step`` with its two GradientTapes.

Deliberate differences:

* Fashion-MNIST is read from the IDX ``.gz`` files with numpy (no
  ``tf.keras.datasets`` download);
* ``train_step`` returns ``(gen_loss, disc_loss)`` so that each epoch's mean
  losses can be printed; it changes nothing in the training;
* a global seed (``--seed``, via ``tf.keras.utils.set_random_seed``) for repeatable runs;
* no image grids and no tf.train.Checkpoint; instead, after each epoch in
  ``--save-at`` it writes ``--num`` images from the generator (``training=False``,
  i.e. BatchNorm's moving statistics), all from the same fixed noise
  (``--noise-seed``), to ``<--out>/tf_epoch_NNN.npy`` as float32 (num, 28, 28)
  in [-1, 1].

TensorFlow is NOT a dependency of gan-job; run this from a scratch venv:

    /tmp/tfvenv/bin/python benchmarks/tf_tutorial_train.py --epochs 50 --save-at 1,5,20,50 --out /tmp/tf_dcgan

Each epoch prints one line (wall time, process CPU time, mean losses); the last
line is one JSON object. Epoch time is the training loop alone (the first epoch
also pays for tracing ``train_step``); generating the saved samples is timed
separately. On a shared machine the CPU time is the steadier measure of cost.
"""

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tf_tutorial_step import (  # noqa: E402  (the tutorial's step, reproduced there)
    NOISE_DIM,
    _trainable_count,
    add_threads_flag,
    apply_threads,
    make_tutorial_training,
)

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
BUFFER_SIZE = 60000
GENERATE_BATCH = 1000  # images per generator call when writing samples


def read_idx_images(path):
    """(N, 28, 28) uint8 from an IDX3 file, gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, count, rows, cols = np.frombuffer(data, dtype=">u4", count=4)
    if magic != 2051:
        raise ValueError(f"{path}: not an IDX3 image file (magic {magic})")
    images = np.frombuffer(data, dtype=np.uint8, offset=16)
    if images.size != count * rows * cols:
        raise ValueError(f"{path}: expected {count}x{rows}x{cols} pixels, found {images.size}")
    return images.reshape(count, rows, cols)


def parse_save_at(text, epochs):
    try:
        epochs_to_save = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--save-at must be a comma list of epochs, got {text!r}")
    bad = [e for e in epochs_to_save if not 1 <= e <= epochs]
    if bad:
        raise argparse.ArgumentTypeError(f"--save-at epochs {bad} are outside 1..{epochs}")
    return epochs_to_save


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"folder with train-images-idx3-ubyte.gz (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument("--epochs", type=int, default=50, help="epochs (default 50, the tutorial's)")
    parser.add_argument(
        "--save-at", default=None, help="comma list of epochs after which to write samples (default: the last epoch)"
    )
    parser.add_argument("--num", type=int, default=10000, help="images written per save (default 10000)")
    parser.add_argument("--out", default="tf_tutorial_samples", help="output folder (default ./tf_tutorial_samples)")
    parser.add_argument("--seed", type=int, default=0, help="global training seed (default 0)")
    parser.add_argument(
        "--noise-seed", type=int, default=12345, help="seed of the fixed noise used for every save (default 12345)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="train on the first N training images only (smoke tests)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="BATCH_SIZE (default 256, the tutorial's)")
    add_threads_flag(parser)
    args = parser.parse_args()
    if args.epochs < 1 or args.num < 1 or args.batch_size < 1:
        parser.error("--epochs, --num and --batch-size must be >= 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    try:
        save_at = parse_save_at(args.save_at, args.epochs) if args.save_at else [args.epochs]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))

    apply_threads(parser, args.threads)
    tf.keras.utils.set_random_seed(args.seed)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- data, as in the tutorial (but read from the IDX file) ---
    train_images = read_idx_images(Path(args.data_dir) / "train-images-idx3-ubyte.gz")
    if args.limit is not None:
        train_images = train_images[: args.limit]
    train_images = train_images.reshape(train_images.shape[0], 28, 28, 1).astype("float32")
    train_images = (train_images - 127.5) / 127.5  # Normalize the images to [-1, 1]

    BATCH_SIZE = args.batch_size
    noise_dim = NOISE_DIM
    train_dataset = tf.data.Dataset.from_tensor_slices(train_images).shuffle(BUFFER_SIZE).batch(BATCH_SIZE)
    steps_per_epoch = -(-train_images.shape[0] // BATCH_SIZE)

    # --- models, losses, optimizers and train_step, as in the tutorial (tf_tutorial_step.py) ---
    generator, discriminator, train_step = make_tutorial_training(BATCH_SIZE, noise_dim)

    # Fixed noise for every save, independent of the training seed's random stream.
    fixed_noise = np.random.default_rng(args.noise_seed).standard_normal((args.num, noise_dim)).astype(np.float32)

    def write_samples(epoch):
        start = time.perf_counter()
        chunks = [
            generator(fixed_noise[i : i + GENERATE_BATCH], training=False).numpy()
            for i in range(0, args.num, GENERATE_BATCH)
        ]
        images = np.concatenate(chunks).reshape(args.num, 28, 28).astype(np.float32)
        path = out_dir / f"tf_epoch_{epoch:03d}.npy"
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, images)
        os.replace(tmp, path)
        seconds = time.perf_counter() - start
        print(
            f"  wrote {path} ({args.num} images, min {images.min():.3f} max {images.max():.3f}, {seconds:.1f}s)",
            flush=True,
        )
        return str(path)

    print(
        f"tensorflow {tf.__version__}; {train_images.shape[0]} training images, batch {BATCH_SIZE}, "
        f"{steps_per_epoch} steps/epoch, {args.epochs} epochs, saves at {save_at}",
        flush=True,
    )

    epoch_times, epoch_cpu, history, saved = [], [], [], {}
    total_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses = [train_step(image_batch) for image_batch in train_dataset]
        gen_loss = float(np.mean([g.numpy() for g, _ in losses]))
        disc_loss = float(np.mean([d.numpy() for _, d in losses]))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        epoch_times.append(seconds)
        epoch_cpu.append(cpu_seconds)
        history.append(
            {
                "epoch": epoch,
                "seconds": round(seconds, 2),
                "cpu_seconds": round(cpu_seconds, 2),
                "gen_loss": round(gen_loss, 4),
                "disc_loss": round(disc_loss, 4),
            }
        )
        if not (np.isfinite(gen_loss) and np.isfinite(disc_loss)):
            raise SystemExit(f"epoch {epoch}: non-finite loss (gen {gen_loss}, disc {disc_loss})")
        print(
            f"epoch {epoch}/{args.epochs}  time {seconds:.1f}s  cpu {cpu_seconds:.1f}s  gen_loss {gen_loss:.4f}  "
            f"disc_loss {disc_loss:.4f}",
            flush=True,
        )
        if epoch in save_at:
            saved[epoch] = write_samples(epoch)

    total = time.perf_counter() - total_start
    later = epoch_times[1:] or epoch_times
    summary = {
        "framework": "tensorflow",
        "tf_version": tf.__version__,
        "dataset": "fashion-mnist",
        "train_images": int(train_images.shape[0]),
        "batch_size": BATCH_SIZE,
        "buffer_size": BUFFER_SIZE,
        "learning_rate": 1e-4,
        "noise_dim": noise_dim,
        "epochs": args.epochs,
        "steps_per_epoch": steps_per_epoch,
        "seed": args.seed,
        "noise_seed": args.noise_seed,
        "threads": args.threads,
        "g_params": _trainable_count(generator),
        "d_params": _trainable_count(discriminator),
        "first_epoch_s": round(epoch_times[0], 2),
        "median_epoch_s": round(float(np.median(later)), 2),
        "first_epoch_cpu_s": round(epoch_cpu[0], 2),
        "median_epoch_cpu_s": round(float(np.median(epoch_cpu[1:] or epoch_cpu)), 2),
        "total_s": round(total, 1),
        "final_gen_loss": history[-1]["gen_loss"],
        "final_disc_loss": history[-1]["disc_loss"],
        "samples": {str(k): v for k, v in saved.items()},
        "num_samples": args.num,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
