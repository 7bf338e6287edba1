"""Placement before `trainer.fit()`: refuse what no node can ever hold, wait for what an autoscaler can start.

Reads the GCS cluster config, the classic autoscaler's status and autoscaler v2's state, then waits holding a
placement group of the workers' bundles. Why: docs/architecture.md#placement
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from job.config import TrainConfig
from job.console import say
from job.errors import UsageError

AUTOSCALER_STATUS_KEY = "__autoscaling_status"  # ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS
STATUS_FRESH_S = 60.0  # a v1 status older than this means its autoscaler is gone
HEAD_NODE_RESOURCE = "node:__internal_head__"
WAIT_REPORT_EVERY_S = 10.0  # how often the wait prints what it waits for
POLL_S = 1.0
UNLIMITED = -1


class PlacementTimeout(Exception):
    """The autoscaler did not start the nodes for the workers within --placement-timeout (exit 1)."""


@dataclass(frozen=True)
class NodeType:
    """One kind of node the cluster has or can start, and how many of it there may be."""

    name: str
    cpus: float
    gpus: float
    max_count: int  # UNLIMITED where the autoscaler sets no maximum

    def slots(self, cpus_per_worker: int, use_gpu: bool) -> int:
        """Workers one node of this type holds."""
        by_cpu = int(self.cpus // cpus_per_worker)
        return min(by_cpu, int(self.gpus)) if use_gpu else by_cpu

    def describe(self) -> str:
        count = "any number" if self.max_count == UNLIMITED else f"at most {self.max_count}"
        return f"{self.name} ({self.cpus:g} CPU, {self.gpus:g} GPU, {count})"


@dataclass(frozen=True)
class ClusterView:
    """What the driver can tell about the cluster it runs on."""

    autoscaler: str | None  # "v1", "v2", or None for a fixed-size cluster
    node_types: tuple[NodeType, ...] | None  # None where the autoscaler's node types cannot be seen
    source: str  # where node_types came from, for messages
    live_nodes: tuple[NodeType, ...]  # the nodes alive now, each as a type of count 1

    def default_cpus_per_worker(self, num_workers: int, use_gpu: bool) -> int:
        """The largest node's CPUs divided among the workers (at least one each); a 0-CPU head does not count."""
        candidates = [
            t for t in (self.node_types or self.live_nodes) if t.max_count != 0 and (t.gpus >= 1 or not use_gpu)
        ]
        return max(1, int(max((t.cpus for t in candidates), default=1) // num_workers))


def request_text(config: TrainConfig) -> str:
    """The request as the user wrote it; for an elastic run its minimum is what must fit."""
    return (
        f"--num-workers {config.workers_text}"
        + (f" (at least {config.num_workers})" if config.elastic else "")
        + f" with --cpus-per-worker {config.cpus_per_worker}"
        + (" and one GPU each (--use-gpu)" if config.use_gpu else "")
    )


def capacity(types: tuple[NodeType, ...], cpus_per_worker: int, use_gpu: bool) -> float:
    """Workers the node types hold at their maximum counts (inf where a count is unlimited)."""
    total = 0.0
    for node_type in types:
        slots = node_type.slots(cpus_per_worker, use_gpu)
        if slots:
            total += math.inf if node_type.max_count == UNLIMITED else slots * node_type.max_count
    return total


def check_fits(config: TrainConfig, view: ClusterView) -> None:
    """Refuse (UsageError, exit 2) a request that the cluster can never hold."""
    cpus = config.cpus_per_worker or 1
    if view.autoscaler is None or view.node_types is None:
        if view.autoscaler is None and capacity(view.live_nodes, cpus, config.use_gpu) < config.num_workers:
            total_cpus = sum(t.cpus for t in view.live_nodes)
            total_gpus = sum(t.gpus for t in view.live_nodes)
            raise UsageError(
                f"{request_text(config)} cannot be placed: the cluster has {total_cpus:g} CPUs and {total_gpus:g} GPUs "
                f"on {len(view.live_nodes)} nodes and no autoscaler; "
                "ask for fewer workers or CPUs per worker, or add nodes"
            )
        return
    # The head is a node type too; it counts as the one node it is.
    types = view.node_types
    if (
        max(capacity(types, cpus, config.use_gpu), capacity(view.live_nodes, cpus, config.use_gpu))
        >= config.num_workers
    ):
        return  # (nodes added by hand, outside the node types, count too)
    holders = [t for t in types if t.slots(cpus, config.use_gpu)]
    if not holders:
        why = (
            "no node type has a GPU"
            if config.use_gpu and not any(t.gpus >= 1 for t in types)
            else "no node type holds even one worker"
        )
    else:
        why = f"the node types hold at most {capacity(types, cpus, config.use_gpu):g} such workers"
    raise UsageError(
        f"{request_text(config)} can never be placed: {why}; node types ({view.source}): "
        + "; ".join(t.describe() for t in types)
        + ". Ask for fewer workers or CPUs per worker, or add a node type that holds them"
    )


# Reading the cluster ------------------------------------------------------------------------


def discover() -> ClusterView:
    """The cluster the connected driver runs on: its live nodes, its autoscaler and its node types."""
    import ray

    live = tuple(
        NodeType(
            "head" if HEAD_NODE_RESOURCE in node["Resources"] else f"node {node['NodeID'][:8]}",
            node["Resources"].get("CPU", 0.0),
            node["Resources"].get("GPU", 0.0),
            1,
        )
        for node in ray.nodes()
        if node.get("Alive")
    )
    types = types_from_gcs_cluster_config()
    if types:
        return ClusterView("v2" if autoscaler_v2_running() else "v1", types, "GCS cluster config", live)
    status = autoscaler_v1_status()
    if status is not None:
        types = types_from_v1_monitor(status)
        return ClusterView("v1", types, "the autoscaler's config", live)
    if autoscaler_v2_running():
        return ClusterView("v2", None, "", live)
    return ClusterView(None, None, "live nodes", live)


def types_from_gcs_cluster_config() -> tuple[NodeType, ...] | None:
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the record: same as no record
        return None
    if config is None or not config.node_group_configs:
        return None
    return types_from_cluster_config(config)


def types_from_cluster_config(config) -> tuple[NodeType, ...]:  # config: autoscaler_pb2.ClusterConfig
    """Node types from the GCS's ClusterConfig message (max_count -1 means no limit)."""
    return tuple(
        NodeType(
            group.name,
            float(group.resources.get("CPU", 0)),
            float(group.resources.get("GPU", 0)),
            UNLIMITED if group.max_count < 0 else int(group.max_count),
        )
        for group in config.node_group_configs
    )


def autoscaler_v1_status() -> dict | None:
    """The classic autoscaler's latest status, if one has written it recently."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_STATUS_KEY)
    if not raw:
        return None
    try:
        status = json.loads(raw)
    except ValueError:
        return None
    if "autoscaler_report" not in status or time.time() - float(status.get("time", 0)) > STATUS_FRESH_S:
        return None  # a monitor without an autoscaler, or one that has stopped
    if is_read_only(status):
        return None  # `ray start --head` without --autoscaling-config: nothing is ever started
    return status


def is_read_only(status: dict) -> bool:
    """Whether a v1 status comes from the read-only provider, which only mirrors the live nodes."""
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return all(node_type == f"node_{node_id}" for node_id, node_type in mapping.items())


def types_from_v1_monitor(status: dict) -> tuple[NodeType, ...] | None:
    """The node types of the v1 monitor's --autoscaling-config, when its process is on this machine."""
    try:
        argv = Path(f"/proc/{int(status['monitor_pid'])}/cmdline").read_bytes().decode().split("\0")
    except (KeyError, ValueError, OSError):
        return None
    if not any(arg.endswith("monitor.py") for arg in argv):
        return None  # another machine's pid: the driver is not on the head
    path = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--autoscaling-config=")), None)
    if path is None:
        return None
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return types_from_autoscaling_config(config)


def types_from_autoscaling_config(config: dict) -> tuple[NodeType, ...]:
    """Node types of a classic cluster config; the head type counts as its one node."""
    head_type = config.get("head_node_type")
    overall_max = int(config.get("max_workers", UNLIMITED))
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = spec.get("resources") or {}
        max_count = 1 if name == head_type else int(spec.get("max_workers", overall_max))
        if overall_max != UNLIMITED and name != head_type:
            max_count = min(max_count, overall_max)
        types.append(NodeType(name, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), max_count))
    return tuple(types)


def _cluster_status_reply():  # -> autoscaler_pb2.GetClusterStatusReply | None
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    try:
        raw = GcsClient(address=ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10)
    except Exception:  # noqa: BLE001 - a GCS that cannot answer: no v2 information
        return None
    reply = GetClusterStatusReply()
    reply.ParseFromString(raw)
    return reply


def autoscaler_v2_running() -> bool:
    reply = _cluster_status_reply()
    return bool(reply is not None and reply.autoscaling_state.autoscaler_state_version)


def infeasible_bundles(reply) -> list[dict[str, float]]:
    """The bundles of gang requests (placement groups) that autoscaler v2 reports no node type can hold."""
    if reply is None:
        return []
    return [
        dict(request.resources_bundle)
        for gang in reply.autoscaling_state.infeasible_gang_resource_requests
        for request in gang.requests
    ]


# Waiting for the autoscaler -----------------------------------------------------------------


def wait_for_workers(config: TrainConfig, view: ClusterView) -> None:
    """Hold the workers' bundles until the cluster places them all; raise PlacementTimeout past the deadline."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    bundle = {"CPU": float(config.cpus_per_worker or 1), **({"GPU": 1.0} if config.use_gpu else {})}
    wanted = f"{config.num_workers} workers of {config.cpus_per_worker} CPU" + (" + 1 GPU" if config.use_gpu else "")
    started = time.monotonic()
    deadline = started + config.placement_timeout
    # PACK, as Ray Train asks for its own workers: the same request the autoscaler will see next.
    group = placement_group([bundle] * config.num_workers, strategy="PACK", name=f"gan-job-placement-{config.run_name}")
    try:
        next_report = started
        while not group.wait(timeout_seconds=POLL_S):
            now = time.monotonic()
            if view.autoscaler == "v2" and bundle in infeasible_bundles(_cluster_status_reply()):
                raise UsageError(
                    f"{request_text(config)} can never be placed: "
                    f"the autoscaler reports that no node type holds a worker of {bundle}"
                )
            if now >= next_report:
                say(
                    f"waiting for {wanted}: the autoscaler is starting nodes "
                    f"({int(now - started)} s of --placement-timeout {config.placement_timeout} s)"
                )
                next_report = now + WAIT_REPORT_EVERY_S
            if now >= deadline:
                placed = sum(1 for node in placement_group_table(group).get("bundles_to_node_id", {}).values() if node)
                raise PlacementTimeout(
                    f"{wanted} were not placed within --placement-timeout {config.placement_timeout} s "
                    f"({placed} of {config.num_workers} placed); "
                    "check `ray status` and the autoscaler's log, or raise --placement-timeout"
                )
        if time.monotonic() - started > POLL_S:
            say(f"placed {wanted} after {time.monotonic() - started:.0f} s")
    finally:
        remove_placement_group(group)  # Ray Train asks for the same bundles next; nothing of ours lingers


def place(config: TrainConfig) -> TrainConfig:
    """`config` with its CPUs per worker filled in, once the cluster can hold (or now holds) its workers."""
    view = discover()
    if config.cpus_per_worker is None:
        config = config.replace(cpus_per_worker=view.default_cpus_per_worker(config.num_workers, config.use_gpu))
    check_fits(config, view)
    if view.autoscaler is not None:
        wait_for_workers(config, view)
    return config
