"""TRAK (Park et al. 2023, the ``traker`` package): the opt-in train-test method ``trak``, for classifiers.

At each checkpoint t used, every example's gradient of its margin
m(z) = logit_y(z) - logsumexp_{c != y} logit_c(z) is projected on k random Rademacher directions,
Phi_t = G_t R_t (N x k), and

    INF(i, z) = [(1/T) sum_t  (Phi_t (Phi_t^T Phi_t)^-1 / mean|(Phi_t^T Phi_t)^-1|)_i . phi_t(z)] x (1/T) sum_t (1 - p_t(i))

with p_t(i) the softmax probability of example i's label (traker's ``image_classification`` task, which fits
any classifier: one class label per example, logits out). It is offered because no forward-only setting meets
TracInCP's accuracy on every case of the suite; it needs a backward pass per example and checkpoint and holds
the N x k features and the N x M scores. Its task modelling (the margin of one label's logit) does not fit a
text model whose targets are token sequences: such a run is refused by name, not approximated. Projections run
on traker's ``BasicProjector`` on the analysis's device (no CUDA extension needed). Needs the ``trak`` extra.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from .checkpoints import Checkpoint, load_state_dict
from .directions import ForwardAccess
from .tracin import GRADIENT_LIMIT

_BATCH = 512


def text_run_refusal(what: str) -> str:
    """Why method trak refuses ``what`` (a text model), in the words every caller uses."""
    return (f"method trak: {what} is a text (language-model) run; TRAK's task modelling (traker's "
            "image_classification: the margin of one class label's logit per example) fits classifiers, not "
            "token sequences; use --method tracincp or directions")


def trak_checkpoint_positions(count: int, checkpoints: int) -> list[int]:
    """Positions of the checkpoints TRAK uses: ``count`` spread over the second half of training, always the
    last (its features model a trained network; the suite measured TRAK this way, ``benchmarks/accuracy.py``)."""
    last = checkpoints - 1
    return sorted({int(p) for p in np.linspace(last, last // 2, count).round()})


def trak_features(
    access: ForwardAccess,
    checkpoints: Sequence[Checkpoint],
    parameters: Sequence[str],
    *,
    projection_dim: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, I) with S the (N, M) TRAK scores over ``checkpoints`` (one traker model id each) and I the (M, M)
    identity: the factor form of a matrix traker forms whole. ``parameters``: the tensors whose gradients
    are projected (traker's ``grad_wrt``)."""
    try:
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError as missing:
        raise InputError("method trak: needs the traker package; pip install 'z0inf-pipeline[trak]'") from missing
    (train_x, train_y), (test_x, test_y) = access.train, access.test
    for name, targets in (("train", train_y), ("test", test_y)):
        if targets.dim() != 1 or targets.is_floating_point():
            raise InputError(text_run_refusal(f"the {name} data (targets of shape {tuple(targets.shape)}, not one "
                                              "class label per example)"))
    model = access.model_factory().to(device=device, dtype=access.dtype)
    trainable = dict(model.named_parameters())
    parameters = [name for name in parameters if name in trainable]  # buffers (running statistics) stay put
    n, m = len(train_y), len(test_y)
    held = (n + m) * projection_dim + n * m
    if held > GRADIENT_LIMIT:
        raise InputError(f"method trak: ({n:,} + {m:,} examples) x {projection_dim:,} projections + the {n:,} x "
                         f"{m:,} scores = {held:,} entries, above the limit of {GRADIENT_LIMIT:,}; lower "
                         "--trak-projection-dim or use --method directions")
    if projection_dim > n:
        raise InputError(f"trak_projection_dim={projection_dim}: above the {n} training examples, Phi^T Phi "
                         "cannot be inverted; lower it")

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=access.dtype if x.is_floating_point() else x.dtype)

    grad_dim = sum(trainable[name].numel() for name in parameters)
    states = [{k: v.to(access.dtype) if v.is_floating_point() else v for k, v in load_state_dict(c).items()}
              for c in checkpoints]
    with tempfile.TemporaryDirectory(prefix="trak.") as work:
        traker = TRAKer(
            model=model, task="image_classification", train_set_size=n, save_dir=work, device=str(device),
            use_half_precision=False, logging_level=logging.WARNING, grad_wrt=parameters,
            projector=BasicProjector(grad_dim=grad_dim, proj_dim=projection_dim, seed=seed, device=device,
                                     proj_type=ProjectionType.rademacher, dtype=torch.float32),
        )
        for model_id, state in enumerate(states):
            traker.load_checkpoint(state, model_id=model_id)
            for start in range(0, n, _BATCH):
                batch = (on_device(train_x[start : start + _BATCH]), on_device(train_y[start : start + _BATCH]))
                traker.featurize(batch=batch, num_samples=len(batch[1]))
        traker.finalize_features()
        for model_id, state in enumerate(states):
            traker.start_scoring_checkpoint(exp_name="test", checkpoint=state, model_id=model_id, num_targets=m)
            for start in range(0, m, _BATCH):
                batch = (on_device(test_x[start : start + _BATCH]), on_device(test_y[start : start + _BATCH]))
                traker.score(batch=batch, num_samples=len(batch[1]))
        scores = torch.tensor(np.array(traker.finalize_scores(exp_name="test")), dtype=torch.float64, device=device)
    return scores, torch.eye(m, dtype=torch.float64, device=device)
