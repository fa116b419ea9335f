"""The fault tests reuse the core's checkpoint folders and the Dagster layer's instance fixtures."""

from tests.defs.conftest import contract_run, dagster_home, instance  # noqa: F401
from tests.influence.conftest import checkpoint_dir  # noqa: F401
