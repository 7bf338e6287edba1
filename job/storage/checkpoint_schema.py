"""What a checkpoint's dict holds, checked as it is read, and the readers every command shares.

`job.storage.checkpoint` turns the dict into bytes and back; `job.runtime.state.TrainingState` builds it and
consumes it. A dict that is not what this project writes (a field of another type, weights whose shapes disagree
with its configuration) is refused in one line naming the checkpoint, before anything is built from it.
Why: docs/architecture.md#checkpoints
"""

from __future__ import annotations

import dataclasses

import torch

from gan.models import SUPPORTED_CHANNELS, SUPPORTED_RESOLUTIONS, Discriminator, Generator, parameter_digest
from job.config import EARLIER_SHAPE, SHAPE_FIELDS, TrainConfig
from job.errors import UsageError, flag_name

FORMAT_VERSION = 2  # 2: written with its digest file; 1: without (still read, unverified)
READABLE_FORMATS = (1, 2)
# Each key a checkpoint holds, and what its value must be.
REQUIRED_KEYS = {
    "format_version": int,
    "generator": dict,
    "discriminator": dict,
    "optimizer_g": dict,
    "optimizer_d": dict,
    "epoch": int,
    "step": int,
    "fixed_noise": torch.Tensor,
    "rng": dict,
    "config": dict,
    "data_fingerprint": str,
}
# Keys a checkpoint holds only inside an epoch (--checkpoint-every-steps): the steps of it done, each rank's stat sums.
IN_EPOCH_KEYS = {"epoch_step": int, "epoch_sums": list}
EARLIER_CONDITIONING_KEY = "label_embedding.weight"  # G's label embedding in the first conditional scheme


class CheckpointError(UsageError):
    """A checkpoint that cannot be read safely: damaged, incomplete or not ours."""


def check_contents(state: object, source: str) -> dict:
    """`state` once it holds what this project writes: every key of its kind, and G's and D's weights of the
    shapes its configuration builds; CheckpointError naming `source` otherwise."""
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {source} is not a gan-job checkpoint (keys missing)")
    wrong = [key for key, kind in REQUIRED_KEYS.items() if not _is(state[key], kind)]
    if wrong:
        raise CheckpointError(f"checkpoint {source} is not a gan-job checkpoint ({', '.join(wrong)} of the wrong kind)")
    if not _in_epoch_keys_fit(state):
        raise CheckpointError(f"checkpoint {source} is not a gan-job checkpoint (epoch_step or epoch_sums)")
    if state["format_version"] not in READABLE_FORMATS:
        raise CheckpointError(
            f"checkpoint {source} has format {state['format_version']}, this version reads {READABLE_FORMATS}"
        )
    config = state["config"]
    if not _is(config.get("noise_dim"), int) or config["noise_dim"] < 1 or not isinstance(config.get("data"), str):
        raise CheckpointError(f"checkpoint {source} is not a gan-job checkpoint (its config lacks noise_dim or data)")
    if EARLIER_CONDITIONING_KEY not in state["generator"]:  # that scheme is refused by name when its G is built
        _check_shapes(state, source)
    return state


def _in_epoch_keys_fit(state: dict) -> bool:
    """A checkpoint inside an epoch has a step count >= 1 in it and one vector of stat sums per rank."""
    if any(key in state and not _is(state[key], kind) for key, kind in IN_EPOCH_KEYS.items()):
        return False
    if "epoch_step" not in state:
        return "epoch_sums" not in state
    sums = state.get("epoch_sums", [])
    return state["epoch_step"] >= 1 and all(isinstance(s, torch.Tensor) and s.dim() == 1 for s in sums)


def _is(value: object, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check_shapes(state: dict, source: str) -> None:
    """G's, D's and the EMA's tensors have the shapes that the checkpoint's own configuration builds."""
    classes = state.get("num_classes", 0) if state["config"].get("conditional") else 0
    if not _is(classes, int) or classes < 0:
        raise CheckpointError(f"checkpoint {source} is not a gan-job checkpoint (num_classes of the wrong kind)")
    noise_dim = state["config"]["noise_dim"]
    resolution, channels = image_shape(state)
    if resolution not in SUPPORTED_RESOLUTIONS or channels not in SUPPORTED_CHANNELS:
        raise CheckpointError(f"checkpoint {source} is not a gan-job checkpoint (its config's image shape)")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        wanted = {
            "generator": Generator(noise_dim, classes, resolution, channels),
            "discriminator": Discriminator(classes, resolution, channels),
        }
    if state.get("ema_generator") is not None:
        wanted["ema_generator"] = wanted["generator"]
    for key, network in wanted.items():
        expected = {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}
        stored = state[key]
        found = {name: tuple(t.shape) if isinstance(t, torch.Tensor) else None for name, t in stored.items()}
        if found != expected:
            differing = sorted(set(found) ^ set(expected)) or [n for n in expected if found[n] != expected[n]]
            raise CheckpointError(
                f"checkpoint {source} does not hold what its config says: {key} {differing[0]} is "
                f"{found.get(differing[0])}, --noise-dim {noise_dim}{f' with {classes} classes' if classes else ''} "
                f"makes {expected.get(differing[0])}; it was not written by gan-job as it is"
            )
    if tuple(state["fixed_noise"].shape[1:]) != (noise_dim,):
        raise CheckpointError(f"checkpoint {source}: its fixed_noise is not of --noise-dim {noise_dim}")


def image_shape(checkpoint: dict) -> tuple[int, int]:
    """The resolution and channels a checkpoint's networks are built for (an older one's: 28 x 28 grey)."""
    config = checkpoint["config"]
    return (
        config.get("resolution") or EARLIER_SHAPE["resolution"],
        config.get("channels") or EARLIER_SHAPE["channels"],
    )


def checkpoint_num_classes(checkpoint: dict) -> int:
    """The classes a checkpoint's G and D are conditional on; 0 for an unconditional (or older) checkpoint.

    Refuses, with one line, a conditional checkpoint of the first scheme (the label joined to G's
    noise), which today's G cannot load: that scheme collapsed to one image per class, so such a
    run is retrained, not converted.
    """
    if not checkpoint["config"].get("conditional"):
        return 0
    if EARLIER_CONDITIONING_KEY in checkpoint.get("generator", {}):
        raise UsageError(
            "this checkpoint is of the first conditional scheme (the label joined to G's noise), which made one image "
            "per class and which this version cannot load; "
            "train the run again with --conditional under a new --run-name"
        )
    return int(checkpoint.get("num_classes", 0))


def check_resumable(config: TrainConfig, checkpoint: dict, init_from: str | None = None) -> None:
    """Refuse a checkpoint whose shapes this configuration cannot load, naming the fields; `init_from`: the
    checkpoint is a warm start's (`--init-from`), not the run's own."""
    defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **EARLIER_SHAPE}
    stored = {f: checkpoint["config"].get(f, defaults[f]) for f in SHAPE_FIELDS}  # not in an older config: then
    # A field the configuration leaves open (None: "the data's own", before the driver resolves it) fits any.
    differing = [f for f in SHAPE_FIELDS if getattr(config, f) is not None and stored[f] != getattr(config, f)]
    if differing:
        details = ", ".join(
            f"{flag_name(f)} {_shown(stored[f])} (run) vs {_shown(getattr(config, f))} (now)" for f in differing
        )
        if init_from is not None:
            raise UsageError(
                f"--init-from {init_from} cannot warm-start this configuration: {details.replace('(run)', '(it)')}; "
                "use its values or another checkpoint"
            )
        raise UsageError(
            f"run {config.run_name!r} cannot resume with this configuration: {details}; "
            "use the run's values or a new --run-name"
        )
    classes = checkpoint_num_classes(checkpoint)
    if classes and config.num_classes is not None and classes != config.num_classes:
        subject = f"--init-from {init_from}" if init_from is not None else f"run {config.run_name!r}"
        raise UsageError(
            f"{subject} is conditional on {classes} classes, --data {config.data} has {config.num_classes}; use its "
            f"--data, or another " + ("checkpoint" if init_from is not None else "--run-name")
        )


def _shown(value: object) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def generator_from_checkpoint(checkpoint: dict) -> tuple[Generator, str]:
    """The checkpoint's G in inference mode, conditional where the run was: its EMA weights where it kept
    an EMA, else its weights; and which key that was ("ema_generator" or "generator")."""
    key = "ema_generator" if checkpoint.get("ema_generator") is not None else "generator"
    generator = Generator(
        int(checkpoint["config"]["noise_dim"]), checkpoint_num_classes(checkpoint), *image_shape(checkpoint)
    )
    generator.load_state_dict(checkpoint[key])
    return generator.eval(), key


def checkpoint_digest(checkpoint: dict) -> str:
    """The parameter digest of a checkpoint's G and D, as the run that wrote it computed it."""
    num_classes = checkpoint_num_classes(checkpoint)
    generator = Generator(int(checkpoint["config"]["noise_dim"]), num_classes, *image_shape(checkpoint))
    discriminator = Discriminator(num_classes, *image_shape(checkpoint))
    generator.load_state_dict(checkpoint["generator"])
    discriminator.load_state_dict(checkpoint["discriminator"])
    return parameter_digest(generator, discriminator)
