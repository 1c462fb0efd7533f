"""Joining or starting Ray the same way in every entry point."""

from __future__ import annotations

import os


# The session folder of the local cluster this process started (its logs are copied next to the run's outputs);
# None when it joined an existing cluster or has not started Ray.
STARTED_SESSION: dict[str, str] = {}


def init_ray(**kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a private local one.

    `address="local"` matters on a shared machine: a test or a demo never joins somebody else's cluster.
    """
    import ray

    from distill.console import quiet_ray_data, ray_init_kwargs

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {**ray_init_kwargs(), **kwargs}
    kwargs.setdefault("log_to_driver", True)
    if address == "local":
        # Logical CPUs, not cores: a pipeline holds an engine actor (1 CPU) plus light templating, reading and
        # writing stages at the same time. On a 2-core laptop, counting only 2 deadlocks the read behind the
        # actors; the engine pins its own threads, so a little over-subscription costs nothing.
        kwargs.setdefault("num_cpus", int(os.environ.get("DISTILL_RAY_CPUS", max(4, os.cpu_count() or 1))))
    context = ray.init(address=address, **kwargs)
    if address == "local":
        STARTED_SESSION["dir"] = context.address_info.get("session_dir", "")
    quiet_ray_data()
