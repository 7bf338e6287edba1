"""The node provider of deploy/fake_cluster.py: Ray's fake multi-node provider, plus lost nodes.

Ray's `FakeMultiNodeProvider` keeps a node in its list until the autoscaler terminates it, and the
classic autoscaler keeps faking a heartbeat for a listed node it no longer hears from. So a worker
node killed from outside would stay "pending" forever and never be replaced. A cloud or Kubernetes
reports a preempted machine or a deleted pod as gone; this provider does the same for a node whose
raylet has died, and the autoscaler then starts a replacement when work needs one.

Loaded by the autoscaler as `provider: {type: external, module: fake_provider.PreemptibleFakeProvider}`
(deploy/ on the head's PYTHONPATH).
"""

from __future__ import annotations

import ray._private.ray_constants as ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class PreemptibleFakeProvider(FakeMultiNodeProvider):
    """Fake multi-node provider in which a node whose raylet died is gone, as a preempted pod is."""

    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                node = entry.get("node")  # the head has none: it is not this provider's to lose
                if node is not None and not any(
                    kind == ray_constants.PROCESS_TYPE_RAYLET for kind, _ in node.live_processes()
                ):
                    del self._nodes[node_id]
        return super().non_terminated_nodes(tag_filters)
