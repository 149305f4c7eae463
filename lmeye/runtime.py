"""Connecting to Ray: the same code runs under `ray job submit` and on an embedded local Ray."""

from __future__ import annotations

import logging
import os

from lmeye.config import RayConfig

# Environment every Ray worker needs. img2dataset imports albumentations, which phones home
# at import time unless told not to; usage stats would do the same.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
# Where object storage is (s3fs and botocore read AWS_*, fsspec its FSSPEC_* defaults). Tasks
# that read or write tables carry the driver's values, since Ray's workers may predate them: an
# embedded Ray started before they were set keeps the old ones.
STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_")
# ...but not its secrets: a task's runtime_env is task metadata, shown by Ray's dashboard and
# state API to anyone who can reach them. Nodes sign in with their own environment or instance
# role; a user who wants the driver's keys shipped anyway says so (FORWARD_CREDENTIALS=1).
SECRET_NAME_PARTS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
FORWARD_CREDENTIALS = "LMEYE_FORWARD_CREDENTIALS"
_embedded = False  # set once this process has started its own Ray (init_ray)


def is_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential (AWS_SECRET_ACCESS_KEY...)."""
    return any(part in name.upper() for part in SECRET_NAME_PARTS)


def storage_runtime_env() -> dict | None:
    """The ``runtime_env`` for a task or actor that reads or writes tables: the driver's object
    storage settings without credentials, unless ``$LMEYE_FORWARD_CREDENTIALS=1`` (None when
    there is nothing to pass, so such tasks run in the job's usual workers)."""
    forward = os.environ.get(FORWARD_CREDENTIALS, "") == "1"
    env = {k: v for k, v in os.environ.items()
           if k.startswith(STORAGE_ENV_PREFIXES) and (forward or not is_secret(k))}
    return {"env_vars": env} if env else None


def init_ray(cfg: RayConfig | None = None) -> bool:
    """Connect to (or start) Ray. Returns True when this call started an embedded local Ray.

    Address resolution: ``ray.address`` from the config, else ``$RAY_ADDRESS`` (set by
    `ray job submit` for the job's driver), else a fresh local Ray inside this process's
    session, with the dashboard off so nothing binds a public port (``ray.address: local``
    always starts the latter).
    """
    global _embedded
    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    import ray

    if ray.is_initialized():
        return False
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local": a fresh Ray of this process's own, as below
        # Under `ray job submit` the job's runtime_env (working dir, env vars) already applies;
        # passing another here would replace it, so we pass none.
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # address="local" always starts a fresh Ray: a bare ray.init() would join any cluster that
    # `ray start` left on this machine (even a dead one, and then wait on it forever).
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        # every task, actor and Ray Train worker of this Ray (predict and train included) gets the
        # driver's object storage settings too
        runtime_env={"env_vars": dict(WORKER_ENV) | (storage_runtime_env() or {}).get("env_vars", {})},
    )
    _embedded = True
    return True


def embedded() -> bool:
    """Whether this process runs the embedded Ray it started: one without a dashboard, so without
    Ray's state API, and one that ends with this process."""
    import ray

    return _embedded and ray.is_initialized()
