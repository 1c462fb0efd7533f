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
import logging
import time
from typing import Optional

from distill.storage import read_json, write_json
from serve.protocol import ApiError

log = logging.getLogger("distill.serve")

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


class RolloutKeeper:
    """The gateway's saves of its rollout to a store: resumed at start, saved on every change that must survive a
    restart (at once) and periodically for window updates, each save serialised and taking the state when it
    starts, so the store never goes back to an older state. `status` is what /stats shows of it."""

    def __init__(self, rollout, store, identity: dict, interval_s: float):
        self.rollout, self.store, self.identity, self.interval_s = rollout, store, identity, interval_s
        self.status = {"store": store.describe(), "resumed": False, "saved_revision": None, "saved_at": None,
                       "failures": 0, "last_failure": None}
        self.lock = asyncio.Lock()

    async def resume(self) -> None:
        """Take over the saved rollout if it is of the same task, teacher, student and adapter."""
        saved = await self.store.load()
        if saved and saved.get("identity") == self.identity:
            self.rollout.load_state(saved["rollout"])
            self.status["resumed"] = True
            log.info("resumed the rollout from %s: share %.3f, mode %s, threshold %s, stage %d, %d rollbacks",
                     self.store.describe(), self.rollout.share, self.rollout.mode, self.rollout.threshold,
                     self.rollout.stage, self.rollout.rollbacks)
        elif saved:
            log.warning("the rollout state in %s is of %s, not of %s: starting a new rollout at share %.3f",
                        self.store.describe(), saved.get("identity"), self.identity, self.rollout.share)

    async def save(self) -> None:
        async with self.lock:
            revision = self.rollout.revision
            saved_at = time.time()
            await self.store.save({"identity": self.identity, "saved_at": saved_at,
                                   "rollout": self.rollout.to_state()})
            self.status.update(saved_revision=revision, saved_at=saved_at)

    async def try_save(self) -> None:
        try:
            await self.save()
        except Exception as err:
            # Counted and shown in /stats; the periodic save retries, since the revision is still unsaved.
            self.status["failures"] += 1
            self.status["last_failure"] = f"{type(err).__name__}: {err}"
            log.exception("could not save the rollout state to %s", self.store.describe())

    async def save_or_refuse(self, what: str) -> None:
        """An admin change is answered only once it is saved: a restarted gateway must not undo it."""
        try:
            await self.save()
        except Exception as err:
            raise ApiError(503, f"{what} on this gateway, but the rollout state could not be saved to "
                           f"{self.store.describe()} ({type(err).__name__}: {err}); a restarted gateway would not "
                           f"keep it. The save is retried every {self.interval_s}s") from None

    async def save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.rollout.revision != self.status["saved_revision"]:
                await self.try_save()


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
