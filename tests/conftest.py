import os

import numpy as np
import pytest

from flows.runtime_env import apply_defaults  # noqa: E402

apply_defaults()
# Ray workers inherit the environment: let them import helpers defined in test modules.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))

# Prefect configures logging when first imported (logging.config.dictConfig), which closes every handler
# already installed, absl's among them once a test has loaded TensorFlow (MTCNN); absl's handler closes
# its stream, by then a pytest capture buffer, and the suite dies ("lost sys.stderr"). Imported first,
# Prefect sets logging up before any such handler exists.
from prefect import flow as _prefect_flow  # noqa: E402,F401  (the import that runs Prefect's setup_logging)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A local Ray instance shared by the tests that need one (started on first use)."""
    import ray

    from workers.cluster import RayConfig, connect

    connect(RayConfig(num_cpus=2))  # no-op when already connected
    return ray


def pytest_sessionfinish(session, exitstatus):
    # Prefect stops its temporary server at interpreter exit and logs it to a console pytest has
    # already closed; that harmless "Logging error" traceback would bury the test summary.
    import logging

    logging.raiseExceptions = False
