"""The Dagster layer: assets per MLflow run, GX asset checks, review gate, sensor and jobs.

``z0inf_pipeline.definitions`` loads every definition in this package. Logic that does not
need Dagster lives in the pure packages (influence, training, tracking, quality, review).
"""
