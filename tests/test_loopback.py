"""The local Ray cluster of `gan-job train` (no RAY_ADDRESS) listens on loopback only, and still works.

The cluster is started in a subprocess, not in this one: the suite's shared cluster lives in the pytest process,
and a process has one Ray cluster at most. The subprocess starts it with `start_local_cluster`, runs a Ray Train
TorchTrainer (2 CPU workers, gloo), a Ray Tune trial and State API calls, and lists the listening sockets of the
cluster's processes (`ss`) while each of them runs; this test checks that every one is on 127.0.0.1 or ::1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from job.runtime.local_cluster import make_token_private
from tests.conftest import REPO

# The subprocess: argv[1] the output folder, argv[2] "module:function" that starts the cluster, argv[3] its
# keyword arguments as JSON. Its functions are pickled by value (they live in __main__), so Ray's workers can run
# them. Run it by hand with job.runtime.driver:connect_ray.
CHILD = r'''
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(sys.argv[1])
DRIVER = os.getpid()
USERS = re.compile(r'\("([^"]*)",pid=(\d+),')


def cluster_pids(driver, session_dir):
    """The driver's process tree, and any process whose command line names the session (re-parented ones)."""
    children, named = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        if session_dir in cmdline:
            named.add(int(entry.name))
    tree, todo = set(), [driver]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    return tree | named


def snapshot(phase, driver, session_dir):
    """[phase, process, pid, netid, local address] of every listening socket of the cluster's processes."""
    pids = cluster_pids(driver, session_dir)
    lines = subprocess.run(["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    found = []
    for line in lines:
        fields = line.split()
        for name, pid in USERS.findall(line):
            if int(pid) in pids:
                found.append([phase, name, int(pid), fields[0], fields[4]])
    with open(OUT / f"{phase}.json", "w") as f:
        json.dump(found, f)


def train_loop(config):
    import torch
    import torch.distributed as dist
    import ray.train

    total = torch.ones(1)
    dist.all_reduce(total)  # gloo, between the 2 workers
    assert total.item() == 2.0, total
    if ray.train.get_context().get_world_rank() == 0:
        snapshot("train", config["driver"], config["session_dir"])  # both workers and their process group alive
        (OUT / "master.json").write_text(json.dumps([os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])]))
    dist.barrier()
    ray.train.report({"world": float(total.item())})


def trial(config):
    from ray import tune

    snapshot("tune", config["driver"], config["session_dir"])
    tune.report({"score": config["x"]})


def state_api_in_a_worker():
    from ray.util.state import list_nodes

    return [node.node_ip for node in list_nodes()]  # no address: RAY_ADDRESS, as Ray Train's helpers


def main():
    module, function = sys.argv[2].split(":")
    getattr(importlib.import_module(module), function)(**json.loads(sys.argv[3]))

    import ray
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.state import list_nodes, list_placement_groups

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    context = {"driver": DRIVER, "session_dir": session_dir}
    snapshot("started", DRIVER, session_dir)
    result = TorchTrainer(
        train_loop,
        train_loop_config=context,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="loopback", storage_path=str(OUT / "runs")),
    ).fit()
    assert result.error is None, result.error  # fit() raises on a failed run, too
    grid = tune.Tuner(
        trial,
        param_space={**context, "x": tune.grid_search([1])},
        run_config=tune.RunConfig(name="loopback-tune", storage_path=str(OUT / "tune")),
    ).fit()
    assert not grid.errors and grid[0].metrics["score"] == 1, grid.errors
    address = ray.get_runtime_context().gcs_address  # the driver has no RAY_ADDRESS; other clusters may run
    nodes = list_nodes(address=address)  # the State API: through the dashboard
    assert len(nodes) == 1 and nodes[0].state == "ALIVE", nodes
    list_placement_groups(address=address)
    assert ray.get(ray.remote(state_api_in_a_worker).remote()) == [nodes[0].node_ip]
    snapshot("finished", DRIVER, session_dir)
    (OUT / "result.json").write_text(json.dumps({"session_dir": session_dir, "node_ip": nodes[0].node_ip}))
    ray.shutdown()


main()
'''

LOOPBACK_HOSTS = {"127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"}  # the last: a dual-stack socket bound to 127.0.0.1
START = "job.runtime.local_cluster:start_local_cluster"


def host_of(address: str) -> str:
    """`ss`'s local address without its port and interface: 127.0.0.1:80 -> 127.0.0.1, [::1]:80 -> [::1]."""
    return address.rsplit(":", 1)[0].split("%", 1)[0]


def run_child(out: Path, start: str = START, kwargs: dict | None = None, timeout: float = 900):
    """Start a cluster with `start` in a subprocess and exercise it; returns the CompletedProcess.

    Its own HOME (so its token file is its own) and its own Ray temp folder (short: Ray's socket paths
    must stay within 107 bytes; removed after a successful run), no RAY_ADDRESS. Its processes left behind,
    if any, are killed one by one.
    """
    home = out / "home"
    home.mkdir(parents=True)
    script = out / "child.py"
    script.write_text(CHILD)
    temp = tempfile.mkdtemp(prefix="gjlb-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_TMPDIR=temp, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, str(script), str(out), start, json.dumps(kwargs or {})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # its own session: only what it started
        output, _ = child.communicate()
    finally:
        kill_leftovers(temp)
    if child.returncode == 0:
        shutil.rmtree(temp, ignore_errors=True)  # a failed run keeps its Ray logs there
    return subprocess.CompletedProcess(child.args, child.returncode, output, None)


def kill_leftovers(temp: str) -> None:
    """SIGKILL each process whose command line names our Ray temp folder (ours alone)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def listening(out: Path) -> list[list]:
    rows = []
    for phase in ("started", "train", "tune", "finished"):
        path = out / f"{phase}.json"
        assert path.is_file(), f"no {phase} snapshot"
        rows.extend(json.loads(path.read_text()))
    return rows


def test_local_cluster_listens_on_loopback_only_and_works(tmp_path):
    done = run_child(tmp_path, kwargs={"num_cpus": 2})
    assert done.returncode == 0, done.stdout[-6000:]
    assert "Failed to query Ray Train Controller" not in done.stdout  # the State API, from the PG cleaner
    rows = listening(tmp_path)
    print("\n".join(" ".join(map(str, row)) for row in rows))
    names = {row[1] for row in rows}
    # Every kind of server was seen: the GCS, the raylet, the driver and workers (ray::...), the agents.
    assert {"gcs_server", "raylet"} <= names, names
    assert any(name.startswith("ray::") for name in names), names
    assert any(row[0] == "train" and row[1].startswith("ray::RayTrain") for row in rows), rows
    outside = [row for row in rows if host_of(row[4]) not in LOOPBACK_HOSTS]
    assert not outside, "listening beyond loopback:\n" + "\n".join(map(str, outside))
    assert json.loads((tmp_path / "result.json").read_text())["node_ip"] == "127.0.0.1"
    # torch.distributed's store, hosted by rank 0, was among them: on loopback too.
    master_addr, master_port = json.loads((tmp_path / "master.json").read_text())
    assert ["tcp", f"{master_addr}:{master_port}"] in [[row[3], row[4]] for row in rows if row[0] == "train"], rows
    token = tmp_path / "home" / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) == 64


def test_the_module_imports_neither_ray_nor_torch():
    code = "import sys, job.runtime.local_cluster; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_token_file_is_made_for_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    make_token_private()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) & 0o077 == 0
    first = token.read_text()
    assert len(first) == 64 and int(first, 16) >= 0
    token.chmod(0o644)  # a token already there (made by Ray, say): kept, made private
    make_token_private()
    assert token.read_text() == first and stat.S_IMODE(token.stat().st_mode) == 0o600
    token.write_text("\n")  # no token in its first line: Ray would make one, so a private one is made
    make_token_private()
    assert len(token.read_text()) == 64 and token.read_text() != first


def test_no_token_file_when_ray_is_given_one_or_authentication_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_AUTH_TOKEN", "t"), ("RAY_AUTH_TOKEN_PATH", "/x")):
        with monkeypatch.context() as patch:
            for other in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                patch.delenv(other, raising=False)
            patch.setenv(name, value)
            make_token_private()
            assert not (tmp_path / ".ray").exists(), name
