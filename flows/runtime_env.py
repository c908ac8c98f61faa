"""Environment defaults every fermine entry point (CLI, benches) sets before Prefect, Ray or TensorFlow load."""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # The temporary Prefect server needs more than its default 20 s to start on a busy 2-core machine
    # (and on its first start in a fresh PREFECT_HOME, which migrates its database).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_defaults() -> None:
    """Set each DEFAULTS variable the user has not set."""
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
