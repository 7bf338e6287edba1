"""benchmarks/gpu_check.py rehearsed on a CPU (`--device cpu --quick`), so that a slot of GPU time is never
spent on a bug in the script: every stage runs small and records its result, the Ray Train stage on the
session's local cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.ray
def test_the_gpu_check_runs_every_stage_on_a_cpu_and_records_each(ray_cluster, tmp_path):
    out = tmp_path / "results.json"
    address = ray_cluster.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out),
         "--ray-address", address, "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    results = json.loads(out.read_text())
    stages = results["stages"]
    assert {name: stage["status"] for name, stage in stages.items()} == {
        "1_versions": "ok",
        "2_bench": "ok",
        "3_equivalence": "ok",
        "4_full_loop": "ok",
        "5_syncs": "ok",
        "6_ray_train": "ok",
    }, {name: stage.get("error") for name, stage in stages.items()}
    assert done.returncode == 0, done.stderr[-2000:]
    assert stages["3_equivalence"]["deterministic_eager_vs_eager"]["bitwise_equal"]
    assert [row["epoch"] for row in stages["4_full_loop"]["graphs_off"]["rows"]] == [1, 2, 3]
    ray = stages["6_ray_train"]
    assert ray["resumed_ok"] and ray["ddp_world_size_1"]["ddp_vs_plain"]["bitwise_equal"]
    assert ray["ddp_world_size_1"]["broadcast_object"] == {"from": "rank 0"}


def _refusal(tmp_path, out) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out),
         "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "where, fix",
    [("folder", "is a folder"), ("missing/results.json", "does not exist"), ("file/results.json", "is not a folder")],
)
def test_an_out_that_cannot_be_written_is_refused_before_any_stage(tmp_path, where, fix):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    done = _refusal(tmp_path, tmp_path / where)
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "--out" in line and fix in line, done.stderr
    assert done.stdout == ""  # no stage started: each prints its name first
    assert not (tmp_path / "work").exists()  # nothing written, not even the scratch folder
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["file", "folder"]


def test_an_out_in_a_folder_that_is_not_writable_is_refused_before_any_stage(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    # Root writes into any folder its mode forbids: for root the folder is a read-only file system instead.
    mounted = os.geteuid() == 0
    if mounted:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)], check=True)
    try:
        done = _refusal(tmp_path, locked / "results.json")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(locked)], check=True)
        locked.chmod(0o700)
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "--out" in line and "not writable" in line, done.stderr
    assert done.stdout == "" and not (tmp_path / "work").exists()
