"""Connecting to Ray: a local instance by default, a cluster by address."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None/"local": start or reuse a local instance; "auto" or ray://host:10001
    num_cpus: int | None = None  # local instance only
    namespace: str = "fermine"


def connect(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once per process; a second call is a no-op."""
    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local" starts a private instance even when a cluster runs on this machine: a plain
    # ray.init() would silently join the most recent one (RAY_ADDRESS, /tmp/ray), and that
    # cluster's owner could stop it mid-stage. Joining one is explicit: "auto" or an address.
    address = "local" if cfg.address in (None, "", "local") else cfg.address
    kwargs: dict = {"namespace": cfg.namespace, "ignore_reinit_error": True, "log_to_driver": True,
                    "logging_level": "WARNING"}
    if address == "local":
        # Loopback only: a laptop run must not listen on the machine's public interfaces. Ray
        # rewrites 127.0.0.1 to the machine's routable IP unless multi-node mode is off, a switch
        # it reads from ray_constants at call time (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read at import).
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.update(include_dashboard=False, num_cpus=cfg.num_cpus, _node_ip_address="127.0.0.1")
        # Workers import our packages from the driver's environment; no runtime_env upload needed.
    ray.init(address=address, **kwargs)


def gpus_available() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0
