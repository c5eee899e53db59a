"""Joining Ray, the one way `annotate --ray` and `serve --ray` do it.

A cluster started here ("local") has token authentication on, set explicitly: a fresh token in a file only
its owner can read (a folder of mode 0700, the file 0600), named to Ray by RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN_PATH (which its worker processes inherit), unless the user set them already. Ray's own
default, a token it writes to ~/.ray/auth_token, was readable by every user of the machine (0644).
Ray's processes listen on every interface whatever stt_fast asks (its gRPC servers bind all of them: GCS,
raylet, workers, the dashboard agent and metrics exporter; Ray 2.60 has no setting to keep them on
loopback): the token is what refuses other clients, and docs/scale.md says which ports to fence.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def private_token() -> Path | None:
    """Turn Ray's token authentication on for a cluster started by this process, with a fresh token in a file
    only its owner reads; the path, or None where the user configured authentication already."""
    if any(os.environ.get(name) for name in AUTH_VARIABLES):
        return None
    folder = Path(tempfile.mkdtemp(prefix="stt_fast-ray-"))  # mkdtemp makes it 0700
    path = folder / "auth_token"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(32))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    if "ray._raylet" in sys.modules:  # Ray read its configuration when imported: have it read the variables again
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    return path


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
        private_token()
        cores = os.cpu_count() or 1
        ray.init(num_cpus=max(cores, int(cpus_needed + 0.999)), include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    return True
