"""Placement decisions without a cluster: what can never fit, what to wait for, the default CPUs.

The sources are Ray's own records, built here as Ray writes them: the GCS's ClusterConfig and
GetClusterStatusReply messages (autoscaler v2, which KubeRay runs and which cannot run here) and a
classic autoscaling config (v1). The autoscaling cluster in test_autoscaling.py runs the v1 path
for real.
"""

from __future__ import annotations

import pytest
from ray.core.generated import autoscaler_pb2

from job.config import TrainConfig
from job.errors import UsageError
from job.runtime.placement import (
    UNLIMITED,
    ClusterView,
    NodeType,
    check_fits,
    infeasible_bundles,
    types_from_autoscaling_config,
    types_from_cluster_config,
)

HEAD = NodeType("head", 0, 0, 1)
WORKERS = NodeType("workers", 2, 0, 3)
GPU_WORKERS = NodeType("gpu-workers", 8, 1, 2)


def config(**values) -> TrainConfig:
    return TrainConfig(run_name="r", storage="/tmp/unused", **values)


def autoscaling(*types: NodeType, live: tuple[NodeType, ...] = (HEAD,)) -> ClusterView:
    return ClusterView("v1", types, "test", live)


def test_a_zero_cpu_head_does_not_set_the_default_cpus_per_worker():
    view = autoscaling(HEAD, WORKERS)
    assert view.default_cpus_per_worker(num_workers=1, use_gpu=False) == 2
    assert view.default_cpus_per_worker(num_workers=2, use_gpu=False) == 1
    assert autoscaling(HEAD, WORKERS, GPU_WORKERS).default_cpus_per_worker(num_workers=1, use_gpu=True) == 8


def test_what_the_node_types_hold_at_their_maxima_is_accepted_though_no_node_is_up():
    check_fits(config(num_workers=2, cpus_per_worker=2), autoscaling(HEAD, WORKERS))  # no exception: wait for nodes
    check_fits(config(num_workers=4, cpus_per_worker=1), autoscaling(HEAD, WORKERS))


@pytest.mark.parametrize(
    "request_, why",
    [
        (dict(num_workers=1, cpus_per_worker=1, use_gpu=True), "no node type has a GPU"),
        (dict(num_workers=1, cpus_per_worker=3), "no node type holds even one worker"),
        (dict(num_workers=4, cpus_per_worker=2), "the node types hold at most 3 such workers"),
    ],
)
def test_what_no_node_type_can_hold_is_refused_naming_each_type(request_, why):
    with pytest.raises(UsageError) as refused:
        check_fits(config(**request_), autoscaling(HEAD, WORKERS))
    assert why in str(refused.value)
    assert "head (0 CPU, 0 GPU, at most 1); workers (2 CPU, 0 GPU, at most 3)" in str(refused.value)


def test_an_unlimited_node_type_holds_any_number():
    check_fits(config(num_workers=64, cpus_per_worker=2), autoscaling(NodeType("workers", 2, 0, UNLIMITED)))


def test_an_autoscaler_whose_node_types_cannot_be_seen_is_trusted_and_waited_for():
    check_fits(config(num_workers=64, cpus_per_worker=16), ClusterView("v1", None, "", (HEAD,)))


def test_a_fixed_cluster_is_judged_by_its_live_nodes():
    live = (NodeType("head", 2, 0, 1),)
    check_fits(config(num_workers=2, cpus_per_worker=1), ClusterView(None, None, "live nodes", live))
    with pytest.raises(
        UsageError, match="cannot be placed: the cluster has 2 CPUs and 0 GPUs on 1 nodes and no autoscaler"
    ):
        check_fits(config(num_workers=2, cpus_per_worker=2), ClusterView(None, None, "live nodes", live))


def test_node_types_come_from_the_gcs_cluster_config():
    message = autoscaler_pb2.ClusterConfig()
    group = message.node_group_configs.add(name="gpu-group", min_count=0, max_count=4)
    group.resources.update({"CPU": 8, "GPU": 1, "memory": 2**34})
    message.node_group_configs.add(name="elastic", min_count=0, max_count=-1).resources.update({"CPU": 4})
    parsed = types_from_cluster_config(autoscaler_pb2.ClusterConfig.FromString(message.SerializeToString()))
    assert parsed == (NodeType("gpu-group", 8, 1, 4), NodeType("elastic", 4, 0, UNLIMITED))


def test_node_types_come_from_a_classic_autoscaling_config():
    classic = {
        "max_workers": 3,
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "max_workers": 0},
            "workers": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 5},
            "gpus": {"resources": {"CPU": 4, "GPU": 2}},
        },
    }
    assert types_from_autoscaling_config(classic) == (
        NodeType("ray.head.default", 0, 0, 1),
        NodeType("workers", 2, 0, 3),  # the cluster-wide max_workers caps each type
        NodeType("gpus", 4, 2, 3),
    )


def test_autoscaler_v2s_infeasible_gang_requests_are_read_from_the_cluster_status():
    reply = autoscaler_pb2.GetClusterStatusReply()
    gang = reply.autoscaling_state.infeasible_gang_resource_requests.add()
    for _ in range(2):
        gang.requests.add().resources_bundle.update({"CPU": 1.0, "GPU": 1.0})
    parsed = autoscaler_pb2.GetClusterStatusReply.FromString(reply.SerializeToString())
    assert infeasible_bundles(parsed) == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert infeasible_bundles(autoscaler_pb2.GetClusterStatusReply()) == []


def test_a_head_without_an_autoscaling_config_is_a_fixed_cluster():
    from job.runtime.placement import is_read_only

    head = "a" * 56
    assert is_read_only(
        {"autoscaler_report": {"node_type_mapping": {head: f"node_{head}", "b" * 56: f"node_{'b' * 56}"}}}
    )
    assert not is_read_only(
        {"autoscaler_report": {"node_type_mapping": {head: "ray.head.default", "f" * 56: "workers"}}}
    )
