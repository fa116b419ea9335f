"""Human review of flagged training examples: flag policy, review queue, durable decisions, gate, curation,
and the evidence a reviewer sees (the page, the sheet). The loss tables and predictions it shows are
recomputed by ``training.reevaluate``.

Pure: no Dagster here (the assets in ``z0inf_pipeline.defs`` drive these functions).
"""

from .curation import CuratedSet, curate, retrain_config
from .gate import GateStatus, evaluate_gate
from .layout import RunLayout, check_run_id
from .lineage import decisions_in_force, lineage_decisions, lineage_of
from .policy import FlagPolicy, Flags, flag_scores, robust_z
from .queue import QUEUE_COLUMNS, build_review_queue, detection_quality, read_review_queue, write_review_queue
from .store import ACTIONS, DecisionStore, default_store_path

__all__ = [
    "ACTIONS",
    "CuratedSet",
    "DecisionStore",
    "FlagPolicy",
    "Flags",
    "GateStatus",
    "QUEUE_COLUMNS",
    "RunLayout",
    "build_review_queue",
    "check_run_id",
    "curate",
    "decisions_in_force",
    "default_store_path",
    "detection_quality",
    "evaluate_gate",
    "flag_scores",
    "lineage_decisions",
    "lineage_of",
    "read_review_queue",
    "retrain_config",
    "robust_z",
    "write_review_queue",
]
