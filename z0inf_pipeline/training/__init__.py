"""Training runs that leave what Z0-Inf needs behind: safetensors checkpoints and per-example loss tables."""

from .datasets import (
    BUILTIN_DATASETS,
    DatasetBundle,
    LabelNoise,
    Split,
    confusable_classes,
    curate_train,
    load_dataset,
    relabel,
    subset,
)
from .models import MODEL_KINDS, ModelSpec, build_model
from .recording import SplitRecorder, cross_entropy_per_example
from .trainer import DEMO_CONFIG, TrainConfig, TrainRecipe, TrainResult, checkpoint_steps, train, training_data

__all__ = [
    "DEMO_CONFIG",
    "TrainRecipe",
    "BUILTIN_DATASETS",
    "DatasetBundle",
    "LabelNoise",
    "MODEL_KINDS",
    "ModelSpec",
    "Split",
    "SplitRecorder",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "checkpoint_steps",
    "confusable_classes",
    "cross_entropy_per_example",
    "curate_train",
    "load_dataset",
    "relabel",
    "subset",
    "train",
    "training_data",
]
