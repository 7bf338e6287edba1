"""`--space NAME=SPEC`: one searched dimension over a `train` setting, checked against its declaration.

`lr=log:1e-5:1e-3` and `lr=uniform:1e-5:1e-3` are sampled; `beta1=0,0.5,0.9` is a grid (every value is
tried, as Tune's grid_search). Nothing here imports Ray: the command checks every dimension before any
Ray work, and `to_tune` turns a checked one into Tune's search object.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from job.config import SETTINGS, TrainConfig
from job.errors import UsageError, flag_name
from job.settings import DATASET_NAMES

SAMPLED_KINDS = ("log", "uniform")
MAX_TRIALS = 10_000  # a sweep's trials in all (grid points times samples): more than any cluster here would run
# Settings a sweep may not search: where runs go, how they are placed, and what the sweep itself sets.
NOT_SEARCHABLE = frozenset(
    {
        "storage",
        "run_name",
        "data_dir",
        "s3_endpoint",
        "init_from",
        "epochs",
        "eval_every",
        "num_workers",
        "max_workers",
        "cpus_per_worker",
        "placement_timeout",
        "use_gpu",
        "create_bucket",
        "keep_checkpoints",
        "max_failures",
        "elastic_resize_interval",
        "checkpoint_every",
        "recipe",
    }
)
PBT_MUTABLE = ("lr", "beta1")  # what an exploit can write into a warm-started run's optimizers
SPACE_EXAMPLE = "e.g. --space lr=log:1e-5:1e-3, --space lr=uniform:1e-5:1e-3 or --space beta1=0,0.5,0.9"


@dataclass(frozen=True)
class Dimension:
    """One searched setting: sampled from [low, high] (`log` or `uniform`), or a grid of `values`."""

    name: str  # a TrainConfig field
    kind: str  # "log", "uniform" or "grid"
    values: tuple  # grid: every value; sampled: (low, high)
    text: str  # as the user wrote it, for messages and sweep.json

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"


def searchable() -> list[str]:
    """The settings `--space` accepts, by field name."""
    return [name for name, spec in SETTINGS.items() if name not in NOT_SEARCHABLE and spec.kind is not bool]


def parse_dimension(text: str) -> Dimension:
    """`NAME=SPEC` as a Dimension; UsageError (exit 2) naming `--space` and how to fix it."""
    name, equals, spec_text = text.partition("=")
    name = name.strip().replace("-", "_")
    if not equals or not spec_text.strip():
        raise UsageError(f"--space {text!r} is not NAME=SPEC; {SPACE_EXAMPLE}")
    if name not in searchable():
        raise UsageError(
            f"--space {text!r}: {name!r} is not a setting a sweep searches; use one of: " + ", ".join(searchable())
        )
    spec = SETTINGS[name]
    kind, colon, bounds = spec_text.partition(":")
    if colon and kind.strip() in SAMPLED_KINDS:
        if not spec.numeric:
            raise UsageError(
                f"--space {text!r}: {flag_name(name)} takes one of {', '.join(spec.choices)}, "
                "so it can only be a comma list"
            )
        low_text, _, high_text = bounds.partition(":")
        values = (_value(text, name, low_text), _value(text, name, high_text))
        if not values[0] < values[1]:
            raise UsageError(f"--space {text!r}: the low bound must be below the high one; {SPACE_EXAMPLE}")
        if kind.strip() == "log" and values[0] <= 0:
            raise UsageError(f"--space {text!r}: log-uniform needs a low bound above 0; use uniform, or a grid")
        return Dimension(name, kind.strip(), values, text)
    if colon and kind.strip() not in SAMPLED_KINDS and spec.numeric:
        raise UsageError(f"--space {text!r}: {kind.strip()!r} is not log or uniform; {SPACE_EXAMPLE}")
    values = tuple(_value(text, name, item) for item in spec_text.split(","))
    if len(set(values)) != len(values):
        raise UsageError(f"--space {text!r} lists a value twice; list each once")
    return Dimension(name, "grid", values, text)


def _value(text: str, name: str, raw: str) -> object:
    """One value of `name`, parsed and checked against its declared bounds."""
    try:
        return SETTINGS[name].parse(raw)
    except ValueError as err:
        raise UsageError(f"--space {text!r}: {flag_name(name)} {err}") from None


def parse_space(texts: list[str], scheduler: str) -> list[Dimension]:
    """Every `--space`, one per setting; under PBT only what an exploit can mutate."""
    dimensions = [parse_dimension(text) for text in texts]
    names = [d.name for d in dimensions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--space names {', '.join(map(flag_name, repeated))} twice; give each setting once")
    if scheduler == "pbt":
        other = [d.text for d in dimensions if d.name not in PBT_MUTABLE]
        if other:
            raise UsageError(
                f"--space {other[0]!r}: --scheduler pbt mutates only {' and '.join(PBT_MUTABLE)} "
                "(an exploit keeps the donor's shapes and batch); "
                "search it with asha or fifo"
            )
        if not dimensions:
            raise UsageError(
                "--scheduler pbt needs a --space over lr or beta1 to mutate; e.g. --space lr=log:1e-5:1e-3"
            )
    return dimensions


def corner_values(dimensions: list[Dimension]) -> list[dict]:
    """Settings that every value of the space is checked with: each grid value and each sampled bound, and of a
    sampled integer also its low bound + 1. The settings' rules are ranges, but for one: the global batch must
    split across the workers, and of two neighbouring integers one is not a multiple of any split above 1."""
    corners = [{d.name: value} for d in dimensions for value in d.values]
    for d in dimensions:
        low, high = d.values if not d.is_grid else (None, None)
        if isinstance(low, int) and high > low + 1:
            corners.append({d.name: low + 1})
    return corners


def corner_configs(config: TrainConfig, dimensions: list[Dimension]) -> list[TrainConfig]:
    """The base configuration with each of the space's corner values (`corner_values`), each one checked as `train`
    checks its flags: a refusal names the --space it came from."""
    configs = []
    for corner in corner_values(dimensions):
        dimension = next(d for d in dimensions if d.name in corner)
        try:
            configs.append(config.replace(**corner))
        except UsageError as err:
            sampled = "" if dimension.is_grid else " (a sampled setting may take any value in its range)"
            raise UsageError(f"--space {dimension.text!r}{sampled}: {err}") from None
    return configs


def with_absolute_data(dimensions: list[Dimension]) -> list[Dimension]:
    """The dimensions with a searched dataset's local paths made absolute: trials run in other folders."""
    absolute = [
        dataclasses.replace(
            d,
            values=tuple(
                v if v in DATASET_NAMES or v.startswith("s3://") else os.path.abspath(os.path.expanduser(v))
                for v in d.values
            ),
        )
        if d.name == "data"
        else d
        for d in dimensions
    ]
    return absolute


def trial_count(dimensions: list[Dimension], samples: int) -> int:
    """The trials a sweep runs: every grid point (the product of the grids' sizes) times `samples`."""
    return math.prod(len(d.values) for d in dimensions if d.is_grid) * samples


def to_tune(dimension: Dimension):  # -> a ray.tune search object
    """Tune's search object for a checked dimension (Ray imported here, after every check)."""
    from ray import tune

    if dimension.is_grid:
        return tune.grid_search(list(dimension.values))
    low, high = dimension.values
    if SETTINGS[dimension.name].kind is int:
        return tune.lograndint(low, high + 1) if dimension.kind == "log" else tune.randint(low, high + 1)
    return tune.loguniform(low, high) if dimension.kind == "log" else tune.uniform(low, high)


def to_mutation(dimension: Dimension):  # -> what PopulationBasedTraining's hyperparam_mutations takes
    """A PBT mutation: a grid's values to choose from, or the sampled distribution."""
    return list(dimension.values) if dimension.is_grid else to_tune(dimension)
