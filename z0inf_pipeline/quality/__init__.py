"""Data-quality suites (Great Expectations 1.x) for loss tables, influence scores and curated sets.

Pure: no Dagster here. ``z0inf_pipeline.defs.checks`` wraps these suites as asset checks.
"""

from .suites import (
    ExpectationFailure,
    SuiteReport,
    run_suite,
    validate_curated_set,
    validate_loss_table,
    validate_self_influence,
    validate_topk,
)

__all__ = [
    "ExpectationFailure",
    "SuiteReport",
    "run_suite",
    "validate_curated_set",
    "validate_loss_table",
    "validate_self_influence",
    "validate_topk",
]
