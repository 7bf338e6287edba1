"""docs/cli.md's train flag table and the knobs ConfigMap agree with the one declaration of the train
settings (`TrainConfig`'s fields): the table is the one tools/flag_table.py generates, every knob is
listed, with its variable, at its declared default."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from job.config import SETTINGS, TrainConfig
from job.errors import flag_name
from job.settings import env_var_for

ROOT = Path(__file__).resolve().parent.parent
CLI_PAGE = ROOT / "docs" / "cli.md"
CONFIGMAP = ROOT / "deploy" / "base" / "configmap.knobs.yaml"
GPU_PATCH = ROOT / "deploy" / "components" / "gpu" / "configmap.knobs.patch.yaml"
PROMOTION_FLAGS = ("--promote-to", "--promote-margin")  # train flags with no variable
KNOBS = {name: spec for name, spec in SETTINGS.items() if spec.env}
COMMENTED_KNOB = re.compile(r'^\s*#\s*(GAN_JOB_[A-Z0-9_]+):\s*"?([^"#]*?)"?\s*(#.*)?$')


def declared_default(name: str) -> object:
    """A field's default: None where it has a factory (storage, run name) or a recipe fills it."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return None if field.default is dataclasses.MISSING else field.default


def as_variable(value: object) -> str:
    """A default as its GAN_JOB_* variable holds it: "" for unset, true/false, numbers as written."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_every_config_field_is_a_declared_setting():
    """A new TrainConfig field without `setting(...)` would have no flag, no variable and no bounds."""
    # The MAX of --num-workers MIN-MAX, and what the driver resolves from the data for every worker.
    derived = {"max_workers", "num_classes", "data_fingerprint", "data_cutoff_ns"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - derived == set(SETTINGS)


# docs/cli.md's train flag table ------------------------------------------------------------------


def flag_table():
    """tools/flag_table.py, the generator of the table (a script, not a package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("flag_table", ROOT / "tools" / "flag_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows() -> dict[str, list[str]]:
    """docs/cli.md's train flag table as written: flag → [variable, default, meaning]."""
    rows = {}
    for line in flag_table().current_block(CLI_PAGE.read_text()).splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        found = re.match(r"`(--[a-z0-9-]+)", cells[0]) if cells else None
        if found:
            rows[found.group(1)] = cells[1:]
    return rows


def test_the_table_in_docs_is_the_generated_one():
    """A setting added, removed or changed without running tools/flag_table.py fails here."""
    generator = flag_table()
    assert generator.current_block(CLI_PAGE.read_text()) == generator.render(), f"run {generator.COMMAND}"


def test_the_generated_table_says_so_with_the_command_that_regenerates_it():
    block = flag_table().current_block(CLI_PAGE.read_text())
    assert "Generated" in block.splitlines()[1] and "tools/flag_table.py" in block.splitlines()[1]


def test_the_table_lists_every_train_flag_and_nothing_else():
    assert set(table_rows()) == {flag_name(name) for name in SETTINGS} | set(PROMOTION_FLAGS)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_table_names_each_flags_variable_and_default(name):
    variable, default, _meaning = table_rows()[flag_name(name)]
    assert variable == f"`{env_var_for(name)}`"
    if declared_default(name) is not None:
        shown = flag_table().shown(declared_default(name))
        assert default == shown or default.startswith(f"{shown}, "), f"{flag_name(name)}: docs/cli.md says {default}"


def test_the_promotion_flags_have_no_variable_in_the_table():
    assert all(table_rows()[flag][0] == "none" for flag in PROMOTION_FLAGS)


# The knobs ConfigMap ------------------------------------------------------------------------------


def commented_knobs(path: Path) -> dict[str, str]:
    """`# GAN_JOB_X: "value"` lines: the optional knobs, left at their defaults."""
    return {m.group(1): m.group(2) for m in map(COMMENTED_KNOB.match, path.read_text().splitlines()) if m}


def set_knobs(path: Path) -> dict[str, str]:
    return {name: str(value) for name, value in (yaml.safe_load(path.read_text()).get("data") or {}).items()}


def test_the_configmap_lists_every_knob_once_set_or_commented_out():
    set_, commented = set_knobs(CONFIGMAP), commented_knobs(CONFIGMAP)
    assert not set(set_) & set(commented), "a knob is both set and commented out"
    expected, listed = {env_var_for(name) for name in KNOBS}, set(set_) | set(commented)
    assert listed == expected, {"missing": expected - listed, "unknown": listed - expected}


@pytest.mark.parametrize("name", list(KNOBS))
def test_a_commented_out_knob_is_at_its_declared_default(name):
    commented = commented_knobs(CONFIGMAP)
    if env_var_for(name) in commented:
        assert commented[env_var_for(name)] == as_variable(declared_default(name))


@pytest.mark.parametrize("path", [CONFIGMAP, GPU_PATCH], ids=["base", "gpu"])
def test_a_set_knob_is_valid_for_its_declaration_and_says_why(path):
    lines = path.read_text().splitlines()
    knobs = set_knobs(path)
    assert knobs, f"{path} sets no knob"
    for variable, value in knobs.items():
        name = variable.removeprefix("GAN_JOB_").lower()
        assert name in KNOBS, f"{variable} is not a train setting with a variable"
        KNOBS[name].parse(value)  # ValueError: not a value the flag accepts
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{variable}:"))
        above = [line.strip() for line in lines[max(0, index - 4) : index]]
        why = f"{path.name}: {variable} is set, so it needs a comment above saying why"
        assert above and above[-1].startswith("#"), why
