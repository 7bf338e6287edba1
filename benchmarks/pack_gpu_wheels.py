#!/usr/bin/env python3
"""Pack what the GPU machine lacks as cp312 wheels, for benchmarks/gpu_check.py --wheels (issue 20).

That machine has torch, Python 3.12, pandas, pyarrow, fsspec, requests, msgpack, protobuf, pyyaml
and click, and reaches no package index, as an air-gapped cluster. This script, run where PyPI is
reachable, downloads Ray (the version pyproject.toml pins) and the few dependencies missing there,
at the versions installed here (the ones the test suite passes with), and trims Ray of what a
Python-only job never loads: its Java jar, the dashboard's web build, rllib, serve and llm.

It then checks the size budget: the repository's tracked files plus the wheels must stay under
64 MiB, what one device run carries. The wheels are never committed (dist/ is ignored).

    python benchmarks/pack_gpu_wheels.py            # writes dist/gpu-wheels/, prints the sizes
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_BYTES = 64 * 2**20
# Inside the Ray wheel: what a Python job on one machine never imports.
RAY_DROPPED = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/llm/")
# What the GPU machine lacks besides Ray (from each wheel's METADATA: ray's core and train needs,
# tensorboardX for the recorder).
MISSING = ("jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "attrs", "pydantic", "pydantic-core",
           "annotated-types", "typing-inspection", "tensorboardX")  # fmt: skip
TARGET = ["--only-binary=:all:", "--no-deps", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
          "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--platform", "manylinux_2_28_x86_64"]  # fmt: skip


def ray_pin() -> str:
    """The Ray version pyproject.toml pins (`ray[...]==X`): the image, the manifests and the job use it."""
    found = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    if not found:
        raise SystemExit("pack_gpu_wheels: pyproject.toml pins no ray[...]==VERSION")
    return found.group(1)


def download(requirements: list[str], into: Path) -> None:
    """`pip download` for CPython 3.12 on x86-64 Linux, binary wheels only, no dependencies (listed explicitly)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(into), *TARGET, *requirements], check=True
    )


def trim_ray(wheel: Path, out_dir: Path) -> Path:
    """A copy of Ray's wheel without RAY_DROPPED, its RECORD rewritten to match."""
    target = out_dir / wheel.name
    with (
        zipfile.ZipFile(wheel) as source,
        zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as packed,
    ):
        for member in source.infolist():
            if member.filename.startswith(RAY_DROPPED):
                continue
            data = source.read(member)
            if member.filename.endswith(".dist-info/RECORD"):
                kept = [line for line in data.decode().splitlines() if not line.startswith(RAY_DROPPED)]
                data = ("\n".join(kept) + "\n").encode()
            # keeps external_attr: the binaries stay executable
            packed.writestr(member, data, compress_type=zipfile.ZIP_DEFLATED)
    return target


def tracked_bytes() -> int:
    """The size of the repository's tracked files (what a device run copies besides the wheels)."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout.split(
        b"\0"
    )
    return sum((REPO / name.decode()).stat().st_size for name in names if name and (REPO / name.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "dist" / "gpu-wheels", help="where the wheels go (default dist/gpu-wheels)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):
        old.unlink()

    with tempfile.TemporaryDirectory() as scratch:
        download([f"ray=={ray_pin()}"], Path(scratch))
        (ray_wheel,) = Path(scratch).glob("ray-*.whl")
        trimmed = trim_ray(ray_wheel, args.out)
        print(
            f"ray: {ray_wheel.stat().st_size / 1e6:.1f} MB -> {trimmed.stat().st_size / 1e6:.1f} MB "
            f"without {', '.join(RAY_DROPPED)}"
        )
    download([f"{name}=={importlib.metadata.version(name)}" for name in MISSING], args.out)

    wheels = sorted(args.out.glob("*.whl"))
    wheel_bytes = sum(w.stat().st_size for w in wheels)
    repo_bytes = tracked_bytes()
    total = wheel_bytes + repo_bytes
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 1e6:6.2f} MB  {wheel.name}")
    print(
        f"wheels {wheel_bytes / 2**20:.1f} MiB + tracked repository {repo_bytes / 2**20:.1f} MiB "
        f"= {total / 2**20:.1f} MiB (budget {BUDGET_BYTES / 2**20:.0f} MiB)"
    )
    if total >= BUDGET_BYTES:
        print(
            "pack_gpu_wheels: over the budget; run gpu_check.py in two device runs (see docs/performance.md)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
