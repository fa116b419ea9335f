"""The core's error type: the project's ``InputError`` under its historical name.

``z0inf_pipeline.errors`` is pure, so importing it keeps this package free of MLflow and Dagster.
"""

from ..errors import InputError as InfluenceInputError

__all__ = ["InfluenceInputError"]
