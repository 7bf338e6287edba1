"""Does class conditioning work at all? Train a conditional G and D for a few hundred steps on the
CPU, then ask the project's classifier (the one `gan.metrics` caches) whether the images G makes
for class c are recognised as class c. Chance is 10 %; an unconditional G cannot beat it.

    python benchmarks/conditional_learning_check.py --steps 300 [--grid grid.png]

Uses the `stable` recipe (batch 64, Adam 2e-4, beta1 0.5): on a CPU it gives the most updates per
second. Prints one JSON line per checkpoint of the run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gan.classifier import load_or_train_classifier, predict
from gan.data import dataset_info, iterate_batches, load_split, resolve_data_dir, shard_indices
from gan.models import Discriminator, Generator
from gan.grid import image_grid_png
from gan.sampling import class_grid_inputs, labels_split_evenly, sample, seeded_noise
from gan.step import make_optimizer, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta1", type=float, default=0.5)
    parser.add_argument("--noise-dim", type=int, default=100)
    parser.add_argument("--eval-num", type=int, default=1000, help="generated images scored at each report")
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, help="write a per-class grid (one row per class) here at the end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    folder = resolve_data_dir(args.data, allow_download=False)
    train_set = load_split(folder, "train")
    num_classes = dataset_info(args.data).num_classes
    classifier = load_or_train_classifier(args.data, train_set.images, train_set.labels, train_set.fingerprint).model

    generator, discriminator = Generator(args.noise_dim, num_classes), Discriminator(num_classes)
    optimizer_g = make_optimizer(generator, args.lr, args.beta1)
    optimizer_d = make_optimizer(discriminator, args.lr, args.beta1)
    eval_noise = seeded_noise(args.eval_num, args.noise_dim, seed=12345)
    eval_labels = labels_split_evenly(args.eval_num, range(num_classes))

    def report(step: int, seconds: float) -> None:
        predicted = predict(classifier, sample(generator, eval_noise, eval_labels))
        hits = predicted == eval_labels
        per_class = [round(float(hits[eval_labels == c].float().mean()), 3) for c in range(num_classes)]
        accuracy = round(float(hits.float().mean()), 4)
        print(
            json.dumps(
                {"step": step, "seconds": round(seconds, 1), "class_accuracy": accuracy, "per_class": per_class}
            ),
            flush=True,
        )

    start, step, epoch = time.perf_counter(), 0, 0
    report(0, 0.0)
    while step < args.steps:
        indices = shard_indices(train_set.images.shape[0], 0, 1, epoch, args.seed)
        for real_images, labels in iterate_batches(train_set.images, indices, args.batch_size, labels=train_set.labels):
            noise = torch.randn(real_images.shape[0], args.noise_dim)
            train_step(generator, discriminator, optimizer_g, optimizer_d, real_images, noise, None, labels)
            step += 1
            if step % args.report_every == 0 or step == args.steps:
                report(step, time.perf_counter() - start)
            if step == args.steps:
                break
        epoch += 1
    if args.grid:
        noise, labels = class_grid_inputs(num_classes, 10, args.noise_dim, seed=7)
        args.grid.write_bytes(
            image_grid_png(sample(generator, noise, labels), columns=10)  # one row per class
        )


if __name__ == "__main__":
    main()
