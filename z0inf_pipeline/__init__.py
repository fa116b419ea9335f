"""z0inf-pipeline: zeroth-order data influence (Z0-Inf) as an orchestrated MLOps pipeline.

Data flows one way through the sub-packages; each imports only those before it (``tests/test_architecture.py``
fails on any import cycle): ``influence`` (pure math) -> ``training`` -> ``tracking`` (MLflow) ->
``integrations`` (Hugging Face) -> ``review`` -> ``defs`` (Dagster) -> ``cli``.
"""

__version__ = "0.1.0"
