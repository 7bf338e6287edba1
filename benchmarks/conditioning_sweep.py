"""How should G and D be told the class? Train each conditioning scheme with `--recipe conditional`
and compare their training-time FID and recall: the sweep that chose the scheme of `--conditional`.

    python benchmarks/conditioning_sweep.py --data-dir /usr/share/datasets/fashion-mnist --out /tmp/sweep
        [--epochs 5] [--device cuda]

Each variant is a run of the project's own training loop in one process (`job.runtime.loop.run_worker`
with `LocalSession`), all variants at once, one process each: on a GPU they share it well (each
step waits on kernel launches, not arithmetic); on a CPU give each at least one core. Prints one
line per variant with FID (2,000 images, the project classifier) and recall at every epoch.

Variants, "<G>-<D>" (today's `--conditional` is cbn-proj; `stable` is the unconditional reference):
- G: `joined`, a label embedding (10 numbers) joined to the noise, as cGAN joins a one-hot label
  (the first version of `--conditional`); `cbn`, conditional batch norm (today's `Generator`).
- D: `proj`, projection of the flattened features (today's `Discriminator`); `sn`, the same with
  spectral normalisation; `pool`, projection of the features summed over positions (the paper's
  form, whose networks end in global pooling); `planes`, one-hot label planes joined to the image.
The variants other than today's networks are built here from the unconditional ones: gan/ keeps
only the scheme it uses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["stable", *(f"{g}-{d}" for g in ("joined", "cbn") for d in ("proj", "sn", "pool", "planes"))]


def build_variant(variant: str) -> None:
    """Make `gan.models.Generator` and `Discriminator` build `variant`'s networks when asked for classes."""
    import torch
    from torch import nn
    from torch.nn.utils.parametrizations import spectral_norm

    import gan.models as models

    if variant == "stable":
        return
    g_kind, d_kind = variant.split("-")
    generator_init = models.Generator.__init__
    discriminator_init, discriminator_forward = models.Discriminator.__init__, models.Discriminator.forward

    def joined_init(self, noise_dim: int = 100, num_classes: int = 0) -> None:
        generator_init(self, noise_dim, 0)  # the tutorial's G, then the label's way in
        if num_classes:
            self.num_classes = num_classes
            self.label_embedding = nn.Embedding(num_classes, num_classes)
            self.project[0] = nn.Linear(noise_dim + num_classes, 7 * 7 * 256, bias=False)
            models._keras_init(self.project[0])

    def joined_forward(self, noise, labels=None):
        if labels is not None:
            noise = torch.cat([noise, self.label_embedding(labels).to(noise.dtype)], dim=1)
        return self.upsample(self.project(noise).view(-1, 256, 7, 7))

    def variant_discriminator_init(self, num_classes: int = 0) -> None:
        discriminator_init(self, num_classes)
        if not num_classes:
            return
        if d_kind == "sn":
            for layer in self.layers:
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    spectral_norm(layer)
            spectral_norm(self.label_projection)
        elif d_kind == "pool":
            self.label_projection = nn.Embedding(num_classes, 128)
            nn.init.xavier_uniform_(self.label_projection.weight)
        elif d_kind == "planes":
            del self.label_projection
            self.layers[0] = nn.Conv2d(1 + num_classes, 64, 5, stride=2, padding=2)
            models._keras_init(self.layers[0])

    def variant_discriminator_forward(self, images, labels=None):
        if labels is None or d_kind in ("proj", "sn"):
            return discriminator_forward(self, images, labels)
        if d_kind == "pool":
            features = self.layers[:-1](images)
            projection = (features.sum(dim=(2, 3)) * self.label_projection(labels).to(features.dtype)).sum(dim=1)
            return self.layers[-1](features) + projection.unsqueeze(1)
        planes = nn.functional.one_hot(labels, self.num_classes).to(images.dtype)[:, :, None, None]
        return self.layers(torch.cat([images, planes.expand(-1, -1, *images.shape[2:])], dim=1))

    if g_kind == "joined":  # cbn: today's Generator as it is
        models.Generator.__init__, models.Generator.forward = joined_init, joined_forward
    models.Discriminator.__init__, models.Discriminator.forward = (
        variant_discriminator_init,
        variant_discriminator_forward,
    )


def train_variant(variant: str, data_dir: str, out: Path, epochs: int, device_name: str, limit: int | None) -> None:
    build_variant(variant)
    import torch

    from job.config import TrainConfig
    from job.runtime.local_session import LocalSession
    from job.runtime.loop import run_worker
    from job.storage.location import resolve_location

    recipe = "stable" if variant == "stable" else "conditional"
    config = TrainConfig(data="fashion-mnist", data_dir=data_dir, epochs=epochs, storage=str(out), run_name=variant,
                         recipe=recipe, eval_every=1, keep_checkpoints=1, cpus_per_worker=1, limit=limit)  # fmt: skip
    run_worker(
        config,
        LocalSession(resolve_location(str(out)).child(variant), torch.device(device_name), config.keep_checkpoints),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with Fashion-MNIST's IDX files")
    parser.add_argument("--out", type=Path, required=True, help="where the runs go (one folder per variant)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--limit", type=int, help="train on the first N images only (a quick check of the wiring)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant's run, in a child process
    args = parser.parse_args()
    if args.variant:
        train_variant(args.variant, args.data_dir, args.out, args.epochs, args.device, args.limit)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    children = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
        log = open(args.out / f"{variant}.log", "w")
        command = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        children[variant] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
    for variant, (child, log) in children.items():
        child.wait()
        log.close()
        rows = (
            [json.loads(line) for line in (args.out / variant / "artifacts" / "metrics.jsonl").read_text().splitlines()]
            if child.returncode == 0
            else []
        )
        curve = [
            (row["epoch"], row["quality"]["fid_classifier"], row["quality"]["recall"])
            for row in rows
            if "quality" in row
        ]
        print(json.dumps({"variant": variant, "exit": child.returncode, "epoch_fid_recall": curve}))
    print(f"# {len(children)} variants, {args.epochs} epochs, {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
