"""Bridges from other training frameworks to the run contract (optional extras: ``pip install z0inf-pipeline[hf]``)."""
