"""z0inf-pipeline: zeroth-order data influence (Z0-Inf) as an orchestrated MLOps pipeline.

Data flows one way through the sub-packages:
``training`` -> ``tracking`` (MLflow) -> ``influence`` (pure math) -> ``review`` -> ``defs`` (Dagster).
"""

__version__ = "0.1.0"
