"""Connecting to Ray: a local instance by default, a cluster by address."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

import ray


_ADVICE = ("Check that the cluster is up (`ray status` on the head), the address and the token "
           "(RAY_AUTH_MODE/RAY_AUTH_TOKEN), or leave the address unset for a local instance.")


class ClusterConnectionError(ConnectionError):
    """Ray could not be reached or started; the message says where and what to check."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None/"local": start or reuse a local instance; "auto" or ray://host:10001
    num_cpus: int | None = None  # local instance only
    namespace: str = "fermine"
    # Stream actors' stdout/stderr to this process. Off by default: the aligners' TensorFlow banners and
    # Ray's dedup notices would flood a run's console; actors' errors still reach it as exceptions, and
    # their output stays in Ray's session logs (/tmp/ray/session_latest/logs).
    log_to_driver: bool = False


_CONNECTING = threading.Lock()  # a round's concurrent chains may all ask at once: one initialises


def connect(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once per process; a second call (from any thread) is a no-op."""
    with _CONNECTING:
        _connect(cfg or RayConfig())


def _connect(cfg: RayConfig) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local" starts a private instance even when a cluster runs on this machine: a plain
    # ray.init() would silently join the most recent one (RAY_ADDRESS, /tmp/ray), and that
    # cluster's owner could stop it mid-stage. Joining one is explicit: "auto" or an address.
    address = "local" if cfg.address in (None, "", "local") else cfg.address
    kwargs: dict = {"namespace": cfg.namespace, "ignore_reinit_error": True, "log_to_driver": cfg.log_to_driver,
                    "logging_level": "WARNING"}
    if address == "local":
        # Loopback only: a laptop run must not listen on the machine's public interfaces. Ray
        # rewrites 127.0.0.1 to the machine's routable IP unless multi-node mode is off, a switch
        # it reads from ray_constants at call time (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read at import).
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.update(include_dashboard=False, num_cpus=cfg.num_cpus, _node_ip_address="127.0.0.1")
        # Workers import our packages from the driver's environment; no runtime_env upload needed.
    _check_reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        # ray.init raises several types for "nothing there"; users need one message that says what to do.
        where = "a local Ray instance" if address == "local" else f"the Ray cluster at {address!r}"
        raise ClusterConnectionError(
            f"could not connect to {where}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}. "
            + _ADVICE
        ) from e


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an explicit address nobody listens on: ray.init would retry for minutes."""
    if address in ("local", "auto"):
        return  # local starts one; "auto" finds the node's cluster or says there is none
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterConnectionError(
            f"Ray address {address!r} is not host:port or ray://host:port; use 'auto' on a cluster node "
            "or leave it unset for a local instance"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterConnectionError(
            f"could not connect to the Ray cluster at {address!r}: nothing answers on {host}:{port} ({e}). " + _ADVICE
        ) from None


class ResourcesUnavailableError(RuntimeError):
    """No node of the cluster can give a stage what it asks for; the message says what to change."""


def _node_totals() -> list[dict[str, float]]:
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def workers_fitting(nodes: list[dict[str, float]], need: dict[str, float]) -> int:
    """How many workers each asking ``need`` (Ray resource name -> amount) the nodes hold at once, in total."""
    total = 0
    for node in nodes:
        per = [node.get(k, 0.0) / v for k, v in need.items() if v > 0]
        total += int(min(per) + 1e-9) if per else 1_000_000
    return total


def require_resources(need: dict[str, float], count: int = 1, what: str = "a stage", wait_s: float = 0.0,
                      poll_s: float = 5.0) -> None:
    """Refuse at once (or after ``wait_s`` seconds of waiting for nodes to join, on an autoscaling cluster)
    a request no node of the cluster can ever satisfy: Ray would queue it forever, and the run would
    hang without a word."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        nodes = _node_totals()
        if workers_fitting(nodes, need) >= count:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    asked = ", ".join(f"{v:g} {k}" for k, v in need.items() if v > 0)
    have = "; ".join(", ".join(f"{v:g} {k}" for k, v in sorted(n.items()) if k in need or k in ("CPU", "GPU"))
                     for n in nodes) or "no live node"
    raise ResourcesUnavailableError(
        f"{what} asks for {count} x ({asked}) but the cluster's nodes cannot hold that ({have})"
        + (f", after waiting {wait_s:g} s" if wait_s else "")
        + ". Lower ray.cpus_per_worker / ray.gpus_per_worker (0 = CPU) or the workers, join a cluster that has "
        "them, or on an autoscaling cluster set ray.wait_for_resources_s to wait for nodes to start")


def gpus_available() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0
