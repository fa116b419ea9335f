"""Bridges from other training frameworks to the run contract (optional extras: ``pip install z0inf-pipeline[hf]``)."""


def train_and_log_recipe(recipe, *, progress: bool = False, **options) -> str:
    """Train either of the project's recipes into a new contract run and return its id: a ``TrainConfig``
    through ``tracking.train_and_log``, the ``LMRecipe`` through the Hugging Face callback (``hf``, which
    needs transformers, so imported only then; its ``Trainer`` shows no progress bar). ``options``: those
    of ``tracking.train_and_log``."""
    from ..training.lm import LMRecipe

    if isinstance(recipe, LMRecipe):
        from .hf import train_and_log_lm

        return train_and_log_lm(recipe, **options)
    from ..tracking import train_and_log

    return train_and_log(recipe, progress=progress, **options)
