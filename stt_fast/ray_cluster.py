"""Joining Ray, the one way `annotate --ray` and `serve --ray` do it."""

from __future__ import annotations

import logging
import os


def connect_ray(address: str, *, cpus_needed: float) -> bool:
    """Start or join Ray, unless this process is connected already; True when it was connected here (the
    caller shuts it down). address: "local" starts a cluster in this machine with logical CPUs enough for
    cpus_needed (and at least this machine's cores), "auto" joins the running cluster, anything else is a
    cluster address."""
    import ray

    if ray.is_initialized():
        return False
    # Ray's C++ core logs notices of its own internals at ERROR level on the driver's stderr; keep them out
    # of the user's terminal unless they ask (setting the variable themselves).
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    if address == "local":
        cores = os.cpu_count() or 1
        ray.init(num_cpus=max(cores, int(cpus_needed + 0.999)), include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    return True
