"""Write the table of `gan-job train`'s flags into docs/cli.md, from the declarations.

Each row comes from a flag that `gan-job train` has (job/cli.py builds it): its Setting (job/settings.py;
for the run's settings a field of `TrainConfig` in job/config.py) gives the value it takes, its help, its
bounds and whether a `GAN_JOB_*` variable sets it; the default is the field's declared one, or where a
factory or a recipe fills it, what the help says. The table sits between two markers in docs/cli.md;
everything outside them is left as it is.

    .venv/bin/python tools/flag_table.py            # rewrite the table in docs/cli.md
    .venv/bin/python tools/flag_table.py --check    # exit 1 if docs/cli.md's table is not the generated one

tests/test_knobs.py runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: the project's packages come from here

from job.cli import build_parser  # noqa: E402
from job.config import TrainConfig  # noqa: E402
from job.settings import Setting, env_var_for  # noqa: E402

CLI_PAGE = ROOT / "docs" / "cli.md"
BEGIN = "<!-- train-flags: begin -->"
END = "<!-- train-flags: end -->"
COMMAND = ".venv/bin/python tools/flag_table.py"
# A help that ends in "(default 2, so ...)" or "(default: all)"; not "(default; off until ...)", which explains auto.
TRAILING_DEFAULT = re.compile(r"\s*\(default(?::\s*|\s+)(?P<default>[^()]*(?:\([^()]*\)[^()]*)*)\)$")


def train_actions() -> list[argparse.Action]:
    """The flags of `gan-job train`, in `--help`'s order, each with the Setting that `add_flag` attached."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return [a for a in commands.choices["train"]._actions if hasattr(a, "setting")]  # noqa: SLF001


def declared_default(name: str) -> object:
    """A TrainConfig field's declared default; None where a factory or the recipe fills it, or for a non-field flag."""
    field = next((f for f in dataclasses.fields(TrainConfig) if f.name == name), None)
    if field is None or field.default is dataclasses.MISSING:
        return None
    return field.default


def shown(value: object) -> str:
    """A default as the table shows it: switches on/off, words in backticks, numbers as written."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def flag_cell(action: argparse.Action, spec: Setting) -> str:
    """`--epochs N`, `--data {mnist,fashion-mnist}`, `--use-gpu`: the flag and the value it takes."""
    flag = action.option_strings[0]
    if spec.kind is bool:
        return f"`{flag}`"
    # A metavar where one is declared, else N or X for a number, else the flag's last word (--run-name NAME).
    value = action.metavar or {int: "N", float: "X"}.get(spec.kind) or flag.rsplit("-", 1)[-1].upper()
    return f"`{flag} {value}`"


def row(action: argparse.Action) -> str:
    """One row: flag, variable, default, meaning (the help without its default, then the bounds)."""
    spec: Setting = action.setting  # type: ignore[attr-defined]
    name = action.dest
    meaning = spec.help
    default = declared_default(name)
    trailing = TRAILING_DEFAULT.search(meaning)
    if trailing:  # "(default 2, so a damaged latest has a fallback)": the reason goes with the default
        meaning = meaning[: trailing.start()]
        default_text = trailing.group("default").strip()
    elif default is not None:
        default_text = shown(default)
    else:
        default_text = "off" if spec.kind is bool else "none"
    if spec.numeric:
        meaning += f"; {spec.range_text()}"
    variable = f"`{env_var_for(name)}`" if spec.env else "none"
    cells = [flag_cell(action, spec), variable, default_text, meaning]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def render() -> str:
    """The block between the markers, markers included."""
    lines = [
        BEGIN,
        f"<!-- Generated from the declarations (job/config.py, job/settings.py, job/cli.py): do not edit by hand; "
        f"regenerate with `{COMMAND}`. -->",
        "",
        "| flag | variable | default | meaning |",
        "|---|---|---|---|",
        *(row(action) for action in train_actions()),
        "",
        END,
    ]
    return "\n".join(lines)


def current_block(text: str) -> str:
    """The block between the markers in `text`, markers included; ValueError when they are missing."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/cli.md's table, or with --check say whether it is the generated one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is out of date; write nothing")
    args = parser.parse_args(argv)
    text = CLI_PAGE.read_text()
    old, new = current_block(text), render()
    if args.check:
        if old != new:
            print(f"{CLI_PAGE.relative_to(ROOT)}: the train flag table is out of date; run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    CLI_PAGE.write_text(text.replace(old, new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
