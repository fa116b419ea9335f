"""Data-quality suites (Great Expectations 1.x, the repository's ``gx/`` project) for loss tables, scores,
top-k, curated sets and the flagging of examples for review.

Pure: no Dagster here. ``z0inf_pipeline.defs.checks`` wraps these suites as asset checks and the
``review_queue`` asset flags through ``validate_flagging``.
"""

from .suites import (
    ExpectationFailure,
    FlaggingResult,
    SuiteReport,
    gx_project_dir,
    validate,
    validate_curated_set,
    validate_flagging,
    validate_loss_table,
    validate_self_influence,
    validate_topk,
)

__all__ = [
    "ExpectationFailure",
    "FlaggingResult",
    "SuiteReport",
    "gx_project_dir",
    "validate",
    "validate_curated_set",
    "validate_flagging",
    "validate_loss_table",
    "validate_self_influence",
    "validate_topk",
]
