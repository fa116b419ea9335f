"""The MLflow pyfunc flavour of a contract run's final model: the safetensors weights plus the model spec.

Nothing is pickled. The logged model folder holds ``weights.safetensors`` and ``model.json`` (the run's
model spec and the task); MLflow loads it through this module (``loader_module``), which builds the
network with the project's own model factories (a ``factory`` spec only from the allow-list, as a
run's checkpoints are) and reads the weights as safetensors.

Two tasks:

- ``classifier`` (the built-in recipes' networks): input float32 features ``(n, *input_shape)``, output
  the predicted class of each row (int64);
- ``causal_lm`` (a ``transformers`` causal LM, the LM recipe and the Hugging Face callback): input the
  tensors ``input_ids``, ``attention_mask``, ``labels`` ``(n, L)``, output each sequence's token-mean
  negative log-likelihood of its label tokens (labels -100 masked out), as the contract's loss tables hold it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import ContractError
from ..influence.checkpoints import load_state_dict
from ..training.recording import token_mean_nll

WEIGHTS = "weights.safetensors"
MODEL_JSON = "model.json"
TASKS = ("classifier", "causal_lm")
LM_INPUTS = ("input_ids", "attention_mask", "labels")
PREDICT_BATCH = 1024


def task_of(model_spec: Mapping[str, Any]) -> str:
    """``classifier`` for the built-in networks, ``causal_lm`` for a ``factory`` spec (a transformers model)."""
    return "causal_lm" if "factory" in model_spec else "classifier"


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model`` once: tied weights (a LM head sharing the
    embedding) are stored under one name, since safetensors refuses tensors that share memory."""
    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor.detach()
    return state


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load safetensors weights into ``model``; every tensor it leaves out must be tied to one it holds."""
    state = load_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    held = model.state_dict(keep_vars=True)
    loaded = {id(held[name]) for name in state if name in held}
    untied = [name for name in missing if id(held[name]) not in loaded]
    if unexpected or untied:
        raise ContractError(
            f"model weights {path}: tensors {sorted(unexpected)[:5]} are not in the network and {untied[:5]} are "
            "missing from the file"
        )
    return model.eval()


class CheckpointPredictor:
    """A network rebuilt from its spec and safetensors weights; ``predict`` as described in the module."""

    def __init__(self, model: torch.nn.Module, task: str, input_shape: tuple[int, ...] | None = None) -> None:
        if task not in TASKS:
            raise ContractError(f"served model: task {task!r} must be one of {list(TASKS)}")
        self.model, self.task, self.input_shape = model.eval(), task, input_shape

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        with torch.no_grad():
            if self.task == "classifier":
                features = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
                if self.input_shape is not None:
                    features = features.reshape(-1, *self.input_shape)
                return torch.cat(
                    [self.model(chunk).argmax(dim=1) for chunk in features.split(PREDICT_BATCH)]
                ).numpy().astype(np.int64)
            tensors = {k: torch.as_tensor(np.asarray(model_input[k], dtype=np.int64)) for k in LM_INPUTS}
            chunks = zip(*(tensors[k].split(PREDICT_BATCH) for k in LM_INPUTS))
            return torch.cat(
                [token_mean_nll(self.model, dict(zip(LM_INPUTS, chunk))) for chunk in chunks]
            ).numpy().astype(np.float64)


def write_model_folder(folder: Path, model_spec: Mapping[str, Any], weights: Path) -> None:
    """The data folder MLflow stores with the model: the weights file and ``model.json``."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, folder / WEIGHTS)
    (folder / MODEL_JSON).write_text(json.dumps({"model_spec": dict(model_spec), "task": task_of(model_spec)}))


def predictor_from_folder(folder: str | Path) -> CheckpointPredictor:
    """Rebuild the model of a data folder: spec through the factory allow-list, weights as safetensors."""
    from .reader import model_from_spec

    folder = Path(folder)
    try:
        described = json.loads((folder / MODEL_JSON).read_text())
        spec, task = dict(described["model_spec"]), str(described["task"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ContractError(f"served model {folder}: {MODEL_JSON} is missing or malformed ({exc!r})") from None
    model = load_weights(model_from_spec(spec, f"served model {folder}"), folder / WEIGHTS)
    shape = tuple(int(s) for s in spec["input_shape"]) if task == "classifier" else None
    return CheckpointPredictor(model, task, shape)


def _load_pyfunc(data_path: str) -> CheckpointPredictor:
    """MLflow's entry point for ``loader_module`` models."""
    return predictor_from_folder(data_path)
