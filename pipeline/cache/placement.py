"""Where the cache job's teacher replicas run: one GPU each, or N GPUs of one node each.

A replica of a tensor-parallel teacher spans `--tensor-parallel N` GPUs. It is held as one
Ray placement group of N one-GPU bundles packed on one node (`STRICT_PACK`: vLLM's
tensor-parallel workers talk over NVLink or PCIe, not the network), reserved before the
replica starts; the replica's actor runs in it and vLLM starts its N workers in the same
group (`placement_group_capture_child_tasks`). Replicas spread over the cluster's nodes.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kdcache.pipeline.errors import PipelineError

PG_TIMEOUT_S = 600.0


def largest_node_gpus(nodes: list[dict[str, Any]]) -> int:
    """GPUs of the best-provisioned live node, from `ray.nodes()`."""
    return max((int(n.get("Resources", {}).get("GPU", 0)) for n in nodes if n.get("Alive")), default=0)


def check_tensor_parallel(tensor_parallel: int, nodes: list[dict[str, Any]]) -> None:
    """Refuse a replica no node can hold."""
    if tensor_parallel > 1 and tensor_parallel > largest_node_gpus(nodes):
        raise PipelineError(
            f"--tensor-parallel {tensor_parallel} needs {tensor_parallel} GPUs on one node; the largest "
            f"node of this Ray cluster has {largest_node_gpus(nodes)}"
        )


def replica_options(tensor_parallel: int, cpus: int, gpus_available: float) -> tuple[dict[str, Any], Any]:
    """Ray actor options for one replica, and the placement group it reserved (None for one
    GPU or none); the caller removes the group when the job ends."""
    if tensor_parallel == 1:
        return {"num_cpus": cpus, "num_gpus": 1 if gpus_available >= 1 else 0,
                "scheduling_strategy": "SPREAD"}, None
    bundles = [{"GPU": 1, "CPU": 1}] + [{"GPU": 1}] * (tensor_parallel - 1)
    group = placement_group(bundles, strategy="STRICT_PACK")
    try:
        ray.get(group.ready(), timeout=PG_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as exc:
        ray.util.remove_placement_group(group)
        raise PipelineError(
            f"no node had {tensor_parallel} free GPUs for a replica within {PG_TIMEOUT_S:.0f} s "
            "(fewer --workers, or a larger cluster)"
        ) from exc
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    # The actor only drives vLLM; its N workers take the group's GPUs.
    return {"num_cpus": 1, "num_gpus": 0, "scheduling_strategy": strategy}, group
