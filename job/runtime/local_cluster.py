"""The Ray cluster `gan-job` starts on this machine when no cluster is given (no RAY_ADDRESS).

It listens on loopback only and keeps Ray's token authentication (on by default for a new local
cluster), with the token file readable by its owner only. Other Ray clusters may run on the same
machine: every port is either picked free or chosen by Ray, and nothing here touches them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import secrets
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

LOOPBACK = "127.0.0.1"
# The logger of Ray's "Token authentication is enabled" notice (tests/test_console.py pins it).
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray's switch between "a node's address is loopback" (True on macOS/Windows) and "a node's address is the one other
# machines reach it by" (Linux). Read once, when ray._private.ray_constants is imported.
ENABLE_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The module whose TCPStore hosts the store of torch.distributed's env:// rendezvous (Ray Train's default).
TORCH_RENDEZVOUS = "torch.distributed.rendezvous"


def free_port() -> int:
    """A TCP port nothing listens on now, on loopback."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def start_local_cluster(resources: dict[str, float] | None = None, num_cpus: int | None = None) -> None:
    """Start a Ray cluster of this machine's own and connect this process to it as its driver.

    Every socket of the cluster listens on 127.0.0.1 (tests/test_loopback.py checks it): the GCS, the raylet,
    every worker, the dashboard, the agents, the metrics exporters, and in Ray Train's workers torch.distributed's
    store and gloo. Token authentication stays on, with a token file only its owner can read. `resources`: custom
    resources the cluster declares (a sweep's trial drivers take one each); `num_cpus`: its CPUs (default: the
    machine's). Nothing happens when this process is already connected to a cluster.
    """
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    # Every server of the cluster listens on 127.0.0.1 only when the node's address is loopback, and on every
    # interface otherwise (the gRPC servers of the GCS, raylet and workers, the agents, the metrics exporters).
    # But on Linux ray.init replaces the 127.0.0.1 it is given by the machine's routable address
    # (services.resolve_ip_for_localhost), unless ENABLE_RAY_CLUSTER is off, as on macOS. The variable reaches
    # the cluster's processes; the constant is set as well, in case Ray was imported before this call (it only
    # changes how this process finds its own address: it starts one cluster at most).
    os.environ[ENABLE_RAY_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    gcs_port = free_port()
    # The GCS port is picked here, so that every process of the run gets the cluster's address (RAY_ADDRESS):
    # Ray's helpers (Ray Train's placement group cleaner) otherwise guess it, and fail when other Ray clusters
    # run on the machine. RAY_GCS_SERVER_PORT is read by the head that ray.init starts.
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    # The preemption watcher only serves nodes a cloud can take away; Ray Train hands this on to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard's and the autoscaler's Prometheus servers have fixed default ports (44227, 44217): free
    # ones instead, so that another cluster of the machine holding those ports costs nothing.
    os.environ.setdefault("DASHBOARD_METRIC_PORT", str(free_port()))
    os.environ.setdefault("AUTOSCALER_METRIC_PORT", str(free_port()))
    runtime_env = {
        "env_vars": {
            "RAY_ADDRESS": f"{LOOPBACK}:{gcs_port}",
            # Gloo (Ray Train's CPU backend) listens on this interface's address, not on the one the
            # machine's hostname resolves to.
            "GLOO_SOCKET_IFNAME": "lo",
        },
        # Run in every worker process of the cluster as it starts (Ray imports it by this name).
        "worker_process_setup_hook": f"{__name__}.host_torch_store_on_loopback",
    }
    make_token_private()
    # "Token authentication is enabled": Ray's default for a new local cluster, kept on purpose.
    logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)
    _started["here"] = True  # from now on, whatever ray.init has started is this process's to stop
    ray.init(
        _node_ip_address=LOOPBACK,
        dashboard_host=LOOPBACK,  # Ray's default too; stated, since the State API needs the dashboard
        num_cpus=num_cpus,
        runtime_env=runtime_env,
        resources=resources,
        logging_level="WARNING",
        log_to_driver=True,
    )
    node = ray._private.worker._global_node  # noqa: SLF001 (the node ray.init started: its raylet's pid)
    _started["raylets"] = {str(p.process.pid) for p in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])}


# The cluster this process started: whether it did, and its raylet's pid, which every worker of it carries in
# its environment (RAY_RAYLET_PID) even once the raylet is gone.
_started: dict = {}
STOP_WAIT_S = 10.0  # how long processes that outlive Ray's shutdown get to end on SIGTERM before SIGKILL


def stop_local_cluster() -> list[int]:
    """Stop every process of the cluster this process started (nothing when it joined one, or started none):
    Ray's own shutdown, then whatever outlived it (a worker whose raylet a terminal's Ctrl-C killed first),
    terminated, then killed. Returns the pids that were signalled."""
    if not _started.pop("here", False):
        return []  # and Ray is not imported: an interrupt may have come in the middle of its import
    members = cluster_processes(_started.pop("raylets", set()))  # before the shutdown re-parents any of them
    import ray

    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 (a cluster whose GCS a Ctrl-C already ended: the signals below end the rest)
        pass
    alive = [pid for pid in members if _signal(pid, signal.SIGTERM)]
    deadline = time.monotonic() + STOP_WAIT_S
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _running(pid)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    return members


def cluster_processes(raylets: set[str]) -> list[int]:
    """This process's descendants, and every process whose RAY_RAYLET_PID names one of `raylets`, from /proc
    (on a system without it, none: Ray's own shutdown is all there is)."""
    parents, found = {}, set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or another user's
            continue
        parents[int(entry.name)] = int(fields[1])
        if any(line.startswith(b"RAY_RAYLET_PID=") and line[15:].decode() in raylets for line in environ):
            found.add(int(entry.name))
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in found}
        found |= frontier
    found.discard(os.getpid())
    return sorted(found)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; its parent has not reaped it yet


def _signal(pid: int, signum: int) -> bool:
    """Send `signum` to `pid`; whether it was still there."""
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def make_token_private() -> None:
    """Make the token file that Ray's token authentication will use readable by its owner only.

    Ray makes `~/.ray/auth_token` itself when token authentication is on and it finds no token, but with
    the umask's mode, usually 0644 (authentication_token_setup.generate_and_save_token). Ray looks for the
    token in RAY_AUTH_TOKEN, then in the file RAY_AUTH_TOKEN_PATH names, then in ~/.ray/auth_token; when
    neither variable is set, this writes a token (as Ray would: 32 random bytes in hex) to that file with
    mode 0600 before ray.init looks, or tightens the mode of the one already there.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return  # authentication off (RAY_AUTH_MODE=disabled) or not by token: no token file
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # the user's own token: Ray neither makes nor reads ~/.ray/auth_token
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)  # a file already there keeps its token, not its mode
        if not os.read(fd, 4096).split(b"\n", 1)[0].strip():  # Ray reads the first line only
            os.ftruncate(fd, 0)
            os.pwrite(fd, secrets.token_hex(32).encode(), 0)
    finally:
        os.close(fd)


def host_torch_store_on_loopback() -> None:
    """Make torch.distributed's env:// store, which rank 0 of a Ray Train worker group hosts, listen on loopback.

    torch's TCPStore listens on every interface (its server binds the port with in6addr_any or INADDR_ANY)
    unless it is given a socket already listening (`master_listen_fd`); Ray Train gives it MASTER_ADDR, the
    node's address, 127.0.0.1 here, and a free port. So the store is given a socket bound to MASTER_ADDR.
    The local cluster's worker_process_setup_hook: it runs in every worker process as it starts, most of
    which never import torch, so torch is patched when it is imported, not imported here.
    """
    module = sys.modules.get(TORCH_RENDEZVOUS)
    if module is not None:
        _store_on_master_addr(module)
    elif not any(isinstance(finder, _RendezvousFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RendezvousFinder())


class _RendezvousFinder(importlib.abc.MetaPathFinder):
    """Finds torch.distributed.rendezvous as Python would, and patches it once it has been executed."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != TORCH_RENDEZVOUS:
            return None
        sys.meta_path.remove(self)  # once, and so that the search below finds the module itself
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def execute_and_patch(module: ModuleType) -> None:
                execute(module)
                _store_on_master_addr(module)

            spec.loader.exec_module = execute_and_patch
        return spec


def _store_on_master_addr(rendezvous: ModuleType) -> None:
    """Replace the TCPStore that `rendezvous` makes its stores with by one whose server listens on loopback."""
    tcp_store: Callable = rendezvous.TCPStore

    def loopback_store(
        host_name: str, port: int, world_size: int | None = None, is_master: bool = False, *args, **kwargs
    ) -> object:
        if is_master and host_name == LOOPBACK and kwargs.get("master_listen_fd") is None:
            sock = socket.socket()
            try:
                sock.bind((host_name, port))
                sock.listen()
            except OSError:
                sock.close()
                raise
            kwargs["master_listen_fd"] = sock.detach()  # the store's from now on
        return tcp_store(host_name, port, world_size, is_master, *args, **kwargs)

    rendezvous.TCPStore = loopback_store
