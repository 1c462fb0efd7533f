"""How the training workers shard the student: plain FSDP2 over every worker on one node, HSDP when the run spans
nodes — a 2-D device mesh that shards within a node and replicates across nodes.

Why: FSDP2 gathers each layer's frozen base weights before its forward and again before its backward, for every
micro-batch. Sharded over all 8 GPUs of two nodes, the 30B MoE student's ~61 GB base would cross the slower
inter-node link twice per micro-batch (x 4 accumulation). With HSDP each node holds a whole copy of the base,
sharded over its own GPUs; only the LoRA gradients (a few GB) are all-reduced across nodes, once per step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from distill.config import ConfigError


@dataclass(frozen=True)
class MeshLayout:
    """Which ranks shard the model together: `groups[i]` is one replica's shard group (ranks in mesh order)."""
    groups: tuple[tuple[int, ...], ...]

    @property
    def hybrid(self) -> bool:
        return len(self.groups) > 1

    def describe(self) -> str:
        if not self.hybrid:
            return f"fsdp over {len(self.groups[0])}"
        return f"hsdp {len(self.groups)} replicas x {len(self.groups[0])} shards"


def mesh_layout(nodes: list[str], shard_group_size: Optional[int]) -> MeshLayout:
    """The shard groups for workers whose nodes are `nodes[rank]`. Unset `shard_group_size`: one group of every
    worker when they share a node, else one group per node (which needs the same number of workers on each). Set:
    groups of that size, filled node by node, so that a group stays within a node wherever the counts allow."""
    world = len(nodes)
    by_node = sorted(range(world), key=lambda r: (nodes.index(nodes[r]), r))  # ranks of one node next to each other
    counts = Counter(nodes)
    if shard_group_size is None:
        if len(counts) == 1:
            return MeshLayout((tuple(range(world)),))
        if len(set(counts.values())) != 1:
            raise ConfigError(f"HSDP shards within a node and needs the same number of training workers on every "
                              f"node; Ray placed {sorted(counts.values(), reverse=True)} workers on {len(counts)} "
                              "nodes: set train.shard_group_size (a divisor of train.workers)")
        shard_group_size = world // len(counts)
    if world % shard_group_size:
        raise ConfigError(f"train.shard_group_size {shard_group_size} does not divide the {world} training workers")
    return MeshLayout(tuple(tuple(by_node[i:i + shard_group_size]) for i in range(0, world, shard_group_size)))


def device_mesh(layout: MeshLayout, device_type: str):
    """The torch DeviceMesh of a layout: 1-D for plain FSDP2, ("replicate", "shard") for HSDP (fully_shard
    replicates over the first dimension and shards over the second). Every rank builds the same mesh."""
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.tensor(layout.groups, dtype=torch.int)
    if not layout.hybrid:
        return DeviceMesh(device_type, ranks[0], mesh_dim_names=("shard",))
    return DeviceMesh(device_type, ranks, mesh_dim_names=("replicate", "shard"))
