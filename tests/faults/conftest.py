"""The fault tests reuse the core's checkpoint folders and the Dagster layer's instance fixtures."""

from tests.defs.conftest import contract_run, dagster_home, instance  # noqa: F401
from tests.influence.conftest import checkpoint_dir  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "dagster_daemon: starts a real `dagster-daemon run` subprocess (slow, 1-3 min on 2 cores)"
    )
