"""The job on a real autoscaling multi-node Ray cluster: the shape of the standing RayCluster, with a
0-CPU head and worker nodes that Ray's autoscaler starts from zero (the fake multi-node provider
runs each as its own raylet on this machine; see deploy/fake_cluster.py).

- placement: a request no node type can hold is refused at once; one the autoscaler can meet waits
  for its nodes, up to --placement-timeout;
- scheduled retraining: the retraining CronJob's own script, run with the real `ray job submit`
  against the cluster at zero worker nodes, trains on two nodes, checkpoints and promotes to S3,
  and the nodes go again when idle;
- a lost node: a worker node killed mid-epoch; the run resumes from its last checkpoint on a
  replacement node and records every epoch once.

All tests share one cluster (conftest.py's `autoscaling_cluster`); each driver is a subprocess
joined to it with RAY_ADDRESS, as on the head of a real cluster.
"""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from job.storage.checkpoint import checkpoint_folders
from job.storage.location import resolve_location
from tests.conftest import built_overlay, job_env, parse_jsonl
from tests.conftest import metrics_rows as _rows
from tests.faultproxy import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.s3]

BIN = Path(sys.executable).parent
# 2 workers x 1,024 images, 128 per rank per step: 8 steps an epoch.
LOST_NODE_STEPS_PER_EPOCH = 8


def no_worker_nodes(cluster) -> None:
    """Wait until the autoscaler has removed every worker node (a test before may have left idle ones)."""
    wait_until(lambda: not cluster.worker_nodes(), 90, "worker nodes removed when idle", poll_s=0.5)


def driver_env(cluster) -> dict[str, str]:
    """A driver's environment on the head: the cluster's address and token
    (the test process has no knobs: conftest's isolated_home)."""
    return job_env(**cluster.client_env, PATH=f"{BIN}:{job_env()['PATH']}")


def train(cluster, *flags: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job", "train", *flags], env=driver_env(cluster),
                          capture_output=True, text=True, timeout=timeout_s)  # fmt: skip


@contextlib.contextmanager
def background_train(cluster, data_dir: Path, storage: Path, run_name: str, *flags: str):
    """A `train` driver running while the test acts on the cluster;
    killed (its output shown) if the test fails first."""
    driver = subprocess.Popen(
        [sys.executable, "-m", "job", "train", "--data", "fashion-mnist", "--data-dir", str(data_dir),
         "--storage", str(storage), "--run-name", run_name, "--eval-every", "0", *flags],
        env=driver_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield driver
    finally:
        if driver.poll() is None:
            driver.kill()
            print(driver.communicate()[0][-4000:])  # what the driver said, for a run that hung


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The driver's own stderr lines (Ray's autoscaler events, prefixed '(autoscaler', left out)."""
    return [line for line in done.stderr.splitlines() if line.strip() and "(autoscaler" not in line]


# Placement --------------------------------------------------------------------------------------


def test_the_test_cluster_has_the_standing_raycluster_shape(autoscaling_cluster):
    shape = autoscaling_cluster.shape
    assert shape.head_cpus == 0
    assert [(g.name, g.cpus, g.gpus, g.min_replicas, g.max_replicas) for g in shape.groups] == [("workers", 1, 0, 0, 2)]


@pytest.mark.parametrize(
    "flags, why",
    [
        (["--use-gpu"], "no node type has a GPU"),
        (["--cpus-per-worker", "2"], "no node type holds even one worker"),
        (["--num-workers", "4", "--cpus-per-worker", "1"], "the node types hold at most 2 such workers"),
        (
            ["--num-workers", "3-4", "--cpus-per-worker", "1", "--batch-size", "240"],
            "(at least 3) with --cpus-per-worker 1 can never",
        ),
    ],
    ids=["gpu", "cpus-per-worker", "num-workers", "elastic-minimum"],
)
def test_a_request_no_node_type_can_hold_is_refused_at_once_naming_the_node_types(
    autoscaling_cluster, tmp_path, flags, why
):
    storage = tmp_path / "runs"
    started = time.monotonic()
    done = train(
        autoscaling_cluster, "--data", "fashion-mnist", "--storage", str(storage), "--run-name", "never", *flags
    )
    lines = error_lines(done)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, lines
    assert why in lines[0] and "workers (1 CPU, 0 GPU, at most 2)" in lines[0] and "ray.head.default (0 CPU" in lines[0]
    assert time.monotonic() - started < 60  # at once: no wait for nodes that can never come
    assert not storage.exists()


def test_a_request_the_autoscaler_cannot_meet_in_time_gives_up_at_the_placement_timeout(autoscaling_cluster, tmp_path):
    no_worker_nodes(autoscaling_cluster)
    storage = tmp_path / "runs"
    done = train(autoscaling_cluster, "--data", "fashion-mnist", "--storage", str(storage), "--run-name", "late",
                 "--num-workers", "2", "--cpus-per-worker", "1", "--placement-timeout", "1")  # fmt: skip
    lines = error_lines(done)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, lines
    assert "2 workers of 1 CPU were not placed within --placement-timeout 1 s" in lines[0]
    assert "waiting for 2 workers of 1 CPU: the autoscaler is starting nodes" in done.stdout
    assert not storage.exists()


# A lost node ------------------------------------------------------------------------------------


def test_a_worker_node_lost_mid_epoch_is_replaced_and_the_run_resumes_from_its_checkpoint(
    autoscaling_cluster, fashion_mnist_dir, tmp_path
):
    cluster = autoscaling_cluster
    run = tmp_path / "runs" / "lost-node"
    # Two epochs: the node goes half-way through the second, which then runs again from epoch 1's checkpoint.
    flags = ("--epochs", "2", "--limit", "2048", "--num-workers", "2", "--cpus-per-worker", "1", "--batch-size", "256")
    with background_train(cluster, fashion_mnist_dir, tmp_path / "runs", "lost-node", *flags) as driver:
        # Epoch 1 done and checkpointed: epoch 2 is under way. Kill a node half-way through it.
        first = wait_until(
            lambda: _rows(run) and checkpoint_folders(resolve_location(str(run))) and _rows(run),
            240,
            "epoch 1 checkpointed",
        )
        time.sleep(first[0]["epoch_time_s"] / 2)
        victim = cluster.worker_nodes()[0]
        killed = cluster.kill_node(victim)
        killed_in_epoch = len(_rows(run)) + 1
        print(
            f"lost node: killed {killed} processes of node {victim[-5:]} in epoch {killed_in_epoch}, "
            f"{first[0]['epoch_time_s'] / 2:.1f} s after epoch 1 ended"
        )
        assert killed > 0
        output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, output[-4000:]
    rows = _rows(run)
    assert killed_in_epoch == 2, f"the node went in epoch {killed_in_epoch}, not mid-run"
    assert [row["epoch"] for row in rows] == [1, 2]
    assert [row["step"] for row in rows] == [LOST_NODE_STEPS_PER_EPOCH * epoch for epoch in (1, 2)]
    assert "resuming run lost-node at epoch 2" in output
    nodes = json.loads((run / "artifacts" / "model.json").read_text())["nodes"]
    print(
        f"lost node: epochs {[r['epoch'] for r in rows]}, steps {[r['step'] for r in rows]}, "
        f"finished on nodes {[n[-5:] for n in nodes]}"
    )
    assert victim not in nodes and len(set(nodes)) == 2, (victim, nodes)


# Scheduled retraining end to end ----------------------------------------------------------------


def retrain_script() -> tuple[str, list[str]]:
    """The retraining CronJob's command and script, from the built local overlay."""
    cronjob = next(o for o in built_overlay("local") if o["kind"] == "CronJob")
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return container["args"][0], container["command"]


class NodeWatch(threading.Thread):
    """Records the most worker nodes seen at once while a run goes on."""

    def __init__(self, cluster) -> None:
        super().__init__(daemon=True)
        self.cluster, self.most, self.first_seen_s, self.done = cluster, 0, None, threading.Event()
        self.started_s = time.monotonic()

    def run(self) -> None:
        while not self.done.is_set():
            count = len(self.cluster.worker_nodes())
            if count and self.first_seen_s is None:
                self.first_seen_s = time.monotonic() - self.started_s
            self.most = max(self.most, count)
            time.sleep(0.5)


def test_the_retraining_cronjob_trains_on_nodes_the_autoscaler_starts_and_they_go_when_idle(
    autoscaling_cluster, s3_service
):
    cluster = autoscaling_cluster
    no_worker_nodes(cluster)
    script, command = retrain_script()
    assert command == ["bash", "-c"]
    firing = f"gan-retrain-{int(time.time()) // 60}"
    # The pod's environment: the firing's name, the standing cluster's job API and its token; no S3
    # settings (s3_service leaves none in this process): the job's driver finds them on the head.
    env = job_env(
        FIRING=firing,
        RAY_API_SERVER_ADDRESS=cluster.dashboard_address,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=cluster.token,
        HOME=str(cluster.temp / "submitter-home"),
        PATH=f"{BIN}:{job_env()['PATH']}",
    )
    env.pop("RAY_ADDRESS", None)
    assert not [name for name in env if name.startswith("AWS_")]
    watch = NodeWatch(cluster)
    submitted = time.time()
    watch.start()
    try:
        done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=420)
    finally:
        watch.done.set()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert watch.most == 2, f"saw at most {watch.most} worker nodes"

    objects = s3_service.objects()
    run = f"standing/{firing}"
    assert any(k.startswith(f"{run}/checkpoint_") and k.endswith("/state.pt") for k in objects), sorted(objects)[:20]
    model = json.loads(objects[f"{run}/artifacts/model.json"])
    first_row = parse_jsonl(objects[f"{run}/artifacts/metrics.jsonl"])[0]
    print(
        f"retraining: first worker node after {watch.first_seen_s:.1f} s, "
        f"first step {first_row['first_step_at'] - submitted:.1f} s after submission, ranks on nodes {model['nodes']}"
    )
    assert len(model["nodes"]) == 2 and len(set(model["nodes"])) == 2, model["nodes"]  # one rank per node
    assert json.loads(objects["standing/gan/LATEST"])["run"].rstrip("/").endswith(run)
    # Idle nodes go: none is left once the idle timeout (10 s here) has passed.
    finished = time.monotonic()
    no_worker_nodes(cluster)
    print(f"retraining: worker nodes gone {time.monotonic() - finished:.1f} s after the job ended")


# Elastic workers --------------------------------------------------------------------------------


def test_an_elastic_run_starts_with_the_minimum_and_grows_when_the_cluster_can_hold_more(
    autoscaling_cluster, fashion_mnist_dir, tmp_path
):
    cluster = autoscaling_cluster
    run = tmp_path / "runs" / "elastic"
    # At first the worker group may have one node only; once two epochs ran on it, two (as when a
    # quota is raised or spot capacity comes back). The autoscaler reads its config at every update.
    cluster.set_max_replicas("workers", 1)
    try:
        no_worker_nodes(cluster)
        # 1,024 images at a global batch of 256: 4 steps an epoch at 1 worker and at 2.
        flags = (
            "--epochs",
            "10",
            "--limit",
            "1024",
            "--num-workers",
            "1-2",
            "--cpus-per-worker",
            "1",
            "--elastic-resize-interval",
            "3",
        )
        with background_train(cluster, fashion_mnist_dir, tmp_path / "runs", "elastic", *flags) as driver:
            wait_until(lambda: len(_rows(run)) >= 2, 240, "two epochs on one worker", poll_s=0.2)
            cluster.set_max_replicas("workers", 2)
            grown_after_epoch = len(_rows(run))
            output, _ = driver.communicate(timeout=300)
    finally:
        cluster.set_max_replicas("workers", 2)  # the manifest's
    assert driver.returncode == 0, output[-4000:]
    rows = _rows(run)
    sizes = [row["world_size"] for row in rows]
    resumes = [(row["epoch"], row["resumed"]) for row in rows if "resumed" in row]
    print(
        f"elastic: second node allowed after epoch {grown_after_epoch}; world size per epoch {sizes}; "
        f"steps {[r['step'] for r in rows]}; resumed {resumes}"
    )
    assert [row["epoch"] for row in rows] == list(range(1, 11))
    # the same steps per epoch at either size
    assert [row["step"] for row in rows] == [4 * epoch for epoch in range(1, 11)]
    assert sizes[:2] == [1, 1] and sizes[-1] == 2 and sizes == sorted(sizes)
    assert len(resumes) == 1 and resumes[0][1]["world_size_before"] == 1  # one resize, from the last checkpoint
    assert len(set(json.loads((run / "artifacts" / "model.json").read_text())["nodes"])) == 2


# A sweep ------------------------------------------------------------------------------------------


def held_worker_groups(cluster) -> list[dict]:
    """The cluster's live placement groups that hold CPUs: Ray Train's worker groups (a trial driver's own
    group holds only the head's `gan_job_trial_driver`), from the State API as `ray list` reads it."""
    done = subprocess.run([str(BIN / "ray"), "list", "placement-groups", "--detail", "--format", "json", "--limit",
                           "1000", "--address", cluster.dashboard_address], env=driver_env(cluster),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return [
        group
        for group in json.loads(done.stdout)
        if group["state"] == "CREATED" and any(b["unit_resources"].get("CPU", 0) > 0 for b in group["bundles"])
    ]


def test_a_sweep_on_the_cluster_releases_the_worker_group_of_a_trial_asha_stops(
    autoscaling_cluster, small_fashion_dir, tmp_path
):
    cluster = autoscaling_cluster
    storage = tmp_path / "sweeps"
    # One trial at a time, in the grid's order: lr 5e-4 trains both epochs; lr 1e-6, far worse at the epoch-1
    # rung, is stopped there (its driver ended, its controller gone with it); lr 4e-4 then trains, and by its
    # first epoch the stopped trial's worker group must be gone (Ray Train's PlacementGroupCleaner). Epochs of
    # 1,536 images (about 5 s here): with 512 (1.5 s) the stopped trial's run could finish epoch 2 before Tune's
    # stop reached it, and then counts as finished.
    sweep = subprocess.Popen(
        [sys.executable, "-m", "job", "tune", "--data", "fashion-mnist", "--data-dir", str(small_fashion_dir),
         "--limit", "1536", "--batch-size", "32", "--eval-num", "64", "--final-eval-num", "64", "--num-workers", "1",
         "--cpus-per-worker", "1", "--epochs", "2", "--storage", str(storage), "--sweep", "s", "--scheduler", "asha",
         "--max-concurrent", "1", "--space", "lr=5e-4,1e-6,4e-4"],
        env=driver_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: list(storage.glob("s/runs/*_00002/artifacts/metrics.jsonl")), 400, "the third trial's epoch")
        held = held_worker_groups(cluster)
        output = sweep.communicate(timeout=300)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
            print(sweep.communicate()[0][-4000:])
    assert sweep.returncode == 0, output[-4000:]
    with open(storage / "s" / "results.csv", newline="") as handle:
        statuses = [row["status"] for row in csv.DictReader(handle)]
    assert statuses == ["finished", "stopped by asha at epoch 1", "finished"], output[-4000:]
    assert len(held) == 1, held  # the third trial's own; none left by the stopped one
