"""Writes the image's hash-pinned requirements, requirements.txt and requirements-gpu.txt beside this file.

Run it with the project's Python, 3.11 or newer: `.venv/bin/python deploy/image/pin_requirements.py`.
The versions are those installed there, the ones the test suite runs with beside Ray (`pip check`
there first); the sha256 of each wheel comes from PyPI's JSON API. The dependencies are those of
pyproject.toml less Ray, which the base image holds, followed through their requirements for
CPython 3.11 on Linux (the Ray image's Python).

- requirements.txt: what both variants install from PyPI, torch's own dependencies included.
- requirements-gpu.txt: torch and torchvision as PyPI has them (CUDA builds) and the CUDA libraries
  they pull in. The -cpu variant takes torch and torchvision from PyTorch's CPU index instead, in a
  step of its own in the Dockerfile, and leaves this file out.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from importlib.metadata import distribution
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The Ray image's interpreter and platforms: requirements are followed, and wheels kept, for these.
LINUX = {
    **default_environment(),
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}
# PyTorch's CPU wheels lack the requirements that PyPI's torch adds on Linux only (CUDA, triton).
CPU_TORCH = {**LINUX, "platform_system": "", "sys_platform": ""}
MACHINES = ("x86_64", "aarch64")
TORCH = {"torch", "torchvision"}


def requirements(name: str, extras: frozenset[str], environment: dict[str, str]) -> list[Requirement]:
    """The requirements of an installed distribution that apply on the image (with these extras)."""
    found = []
    for line in distribution(name).requires or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({**environment, "extra": extra}) for extra in extras | {""}):
            found.append(requirement)
    return found


def closure(roots: list[Requirement], stop: set[str]) -> dict[str, set[str]]:
    """Every distribution the roots need (name -> extras asked for), not following those in `stop`."""
    needed: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in stop or (name in needed and set(requirement.extras) <= needed[name]):
            continue
        needed.setdefault(name, set()).update(requirement.extras)
        todo += requirements(name, frozenset(needed[name]), LINUX)
    return needed


def same_version(key: str, version: str) -> bool:
    try:
        return Version(key) == Version(version)
    except InvalidVersion:
        return False


def wheel_hashes(name: str, version: str) -> list[str]:
    """The sha256 of each wheel of that release that installs on the image's Python and platforms."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as response:
        releases = json.load(response)["releases"]
    # PyPI keys a release by its upload's spelling ("13.0.3"), the metadata may differ ("13.0.3.0").
    files = [file for key, uploads in releases.items() if same_version(key, version) for file in uploads]
    hashes = []
    for file in files:
        if not file["filename"].endswith(".whl") or file.get("yanked"):
            continue
        tags = parse_wheel_filename(file["filename"])[3]
        if any(
            tag.interpreter in ("cp311", "py3", "py311")
            and tag.abi in ("cp311", "abi3", "none")
            and (tag.platform == "any" or ("linux" in tag.platform and tag.platform.endswith(MACHINES)))
            for tag in tags
        ):
            hashes.append(file["digests"]["sha256"])
    if not hashes:
        sys.exit(f"PyPI has no wheel of {name}=={version} for CPython 3.11 on Linux")
    return sorted(hashes)


def write(path: Path, needed: dict[str, set[str]], purpose: str) -> None:
    lines = [
        f"# {purpose}",
        "# Written by pin_requirements.py (beside this file) from the project's environment: do not edit by",
        "# hand. The Dockerfile installs it with --require-hashes.",
    ]
    for name in sorted(needed):
        version = distribution(name).version
        extras = f"[{','.join(sorted(needed[name]))}]" if needed[name] else ""
        lines.append(f"{name}{extras}=={version} \\")
        lines += [f"    --hash=sha256:{digest} \\" for digest in wheel_hashes(name, version)]
        lines[-1] = lines[-1].removesuffix(" \\")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = [Requirement(line) for line in project["dependencies"]]
    roots = [requirement for requirement in roots if canonicalize_name(requirement.name) != "ray"]
    torch_needs = requirements("torch", frozenset(), CPU_TORCH) + requirements("torchvision", frozenset(), LINUX)
    common = closure([r for r in roots if canonicalize_name(r.name) not in TORCH] + torch_needs, stop=TORCH)
    gpu = {name: extras for name, extras in closure(roots, stop=set()).items() if name not in common}
    write(HERE / "requirements.txt", common, "Both variants: the dependencies from PyPI (Ray is in the base image).")
    write(HERE / "requirements-gpu.txt", gpu, "The -gpu variant only: torch and torchvision from PyPI (CUDA builds).")


if __name__ == "__main__":
    main()
