"""Where the gateway keeps the rollout state, so that a restarted gateway replica resumes the rollout (share,
stage, windows, events) instead of starting it over, which would undo a rollback.

- `ActorStateStore` (the default): a detached Ray actor per application, pinned to the head node like Ray's own
  state actors. It outlives gateway replicas and in-place Serve upgrades, not the cluster.
- `UriStateStore` (`rollout.state_uri`): one JSON file, local or in an object store (distill.storage). It outlives
  the cluster too: a RayService upgrade that replaces the RayCluster, a `distill serve` restart.

The state saved is `{"identity": ..., "rollout": Rollout.to_state(), "saved_at": ...}`; the gateway resumes it only
when the identity (task, teacher, student, adapter) matches its own, so deploying a new student starts a new rollout.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from distill.storage import read_json, write_json

STATE_NAMESPACE = "distill"


def state_actor_name(app_name: str) -> str:
    return f"rollout-state-{app_name}"


class RolloutStateHolder:
    """The body of the detached actor: it only holds the last state it was given."""

    def __init__(self):
        self.state: Optional[dict] = None

    def load(self) -> Optional[dict]:
        return self.state

    def save(self, state: dict) -> None:
        self.state = state


class ActorStateStore:
    def __init__(self, app_name: str):
        import ray

        self.name = state_actor_name(app_name)
        # get_if_exists: the restarted gateway finds the actor its predecessor created. The head-node resource
        # keeps it off worker nodes, which come and go (spot, autoscaling).
        self.actor = ray.remote(RolloutStateHolder).options(
            name=self.name, namespace=STATE_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
            resources={"node:__internal_head__": 0.001}).remote()

    def describe(self) -> str:
        return f"detached Ray actor {STATE_NAMESPACE}/{self.name}"

    async def load(self) -> Optional[dict]:
        return await self.actor.load.remote()

    async def save(self, state: dict) -> None:
        await self.actor.save.remote(state)


class UriStateStore:
    def __init__(self, uri: str):
        self.uri = uri

    def describe(self) -> str:
        return self.uri

    async def load(self) -> Optional[dict]:
        # Object-store calls block: keep them off the gateway's event loop.
        return await asyncio.to_thread(read_json, self.uri)

    async def save(self, state: dict) -> None:
        await asyncio.to_thread(write_json, self.uri, state)


def open_state_store(state_uri: Optional[str], app_name: str):
    return UriStateStore(state_uri) if state_uri else ActorStateStore(app_name)


def delete_state_actor(app_name: str) -> None:
    """End the detached actor of an application that is being deleted (its rollout ends with it)."""
    import ray

    try:
        actor = ray.get_actor(state_actor_name(app_name), namespace=STATE_NAMESPACE)
    except ValueError:  # never created: the application used a state_uri, or never started
        return
    ray.kill(actor)
