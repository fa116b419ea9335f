"""One exception type for bad input, so callers (CLI, Dagster) can report it cleanly."""


class InfluenceInputError(ValueError):
    """Raised when an input (file, column, tensor, argument) is unusable; the message names it."""
