"""TracInCP from exact per-example gradients: the opt-in train-test method ``tracincp``.

    INF(i, z) = sum_t eta_t <grad l_i(w_t), grad l_z(w_t)>

over every checkpoint, eta_t the recorded learning rate (uniform where none is recorded): TracIn's
definition, and the peer the suite measures random directions against (``benchmarks/accuracy.py``).
It is offered because no forward-only setting meets its accuracy on every case of the suite; it is not
zeroth-order. It needs a backward pass per example and checkpoint, and holds every example's gradient at one
checkpoint over the chosen parameters and the N x M scores: memory (N + M) x D + N x M, refused above
``GRADIENT_LIMIT`` entries (``--parameters`` narrows D, or use ``directions``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError
from .checkpoints import Checkpoint, load_state_dict
from .directions import ForwardAccess
from .loss_tables import LossFn

# gradient and score entries held at once: 2^28 (1-2 GiB)
GRADIENT_LIMIT = 1 << 28


def per_example_gradients(
    model: torch.nn.Module,
    parameters: Sequence[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """(n, D) gradient of each example's loss over ``parameters`` (in order, flattened), at the model's
    weights in eval mode: ``torch.func.vmap`` of ``grad`` over the examples of a batch. A model whose
    forward vmap cannot batch over examples (data-dependent branches, as in GPT-2's attention-mask code)
    takes one backward pass per example instead."""
    named = {name: p.detach() for name, p in model.named_parameters()}
    missing = [name for name in parameters if name not in named]
    if missing or not parameters:
        raise InputError(f"parameters {missing or list(parameters)}: not parameters of the model")
    chosen = {name: named[name] for name in parameters}
    fixed = {**{n: p for n, p in named.items() if n not in chosen}, **dict(model.named_buffers())}

    def loss_of_one(weights, x, y):
        outputs = torch.func.functional_call(model, {**fixed, **weights}, (x[None],))
        return loss_fn(outputs, y[None])[0]

    batched = torch.func.vmap(torch.func.grad(loss_of_one), in_dims=(None, 0, 0))
    one_at_a_time = torch.func.grad(loss_of_one)
    rows = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(targets), batch_size):
            x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
            try:
                grads = batched(chosen, x, y)
            except RuntimeError:  # vmap met data-dependent control flow: same gradients, one example at a time
                singles = [one_at_a_time(chosen, x[i], y[i]) for i in range(len(y))]
                grads = {name: torch.stack([g[name] for g in singles]) for name in chosen}
            rows.append(torch.cat([grads[name].reshape(len(y), -1) for name in chosen], dim=1))
    finally:
        model.train(was_training)
    return torch.cat(rows)


def tracincp_features(
    access: ForwardAccess,
    checkpoints: Sequence[Checkpoint],
    parameters: Sequence[str],
    eta: torch.Tensor | None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, I) with S = sum_t eta_t G_train(t) G_test(t)^T (N, M), accumulated one checkpoint at a time, and
    I the (M, M) identity: the factor form of a matrix the method forms whole, on ``device``."""
    model = access.model_factory().to(device=device, dtype=access.dtype)
    trainable = dict(model.named_parameters())
    parameters = [name for name in parameters if name in trainable]  # buffers (running statistics) stay put
    size = sum(trainable[name].numel() for name in parameters)
    n, m = len(access.train[1]), len(access.test[1])
    held = (n + m) * size + n * m
    if held > GRADIENT_LIMIT:
        raise InputError(
            f"method tracincp: ({n:,} + {m:,} examples) x {size:,} parameters + the {n:,} x {m:,} scores = {held:,} "
            f"entries, above the limit of {GRADIENT_LIMIT:,}; narrow --parameters (e.g. the head) or use --method "
            "directions (forward passes, no gradients held)"
        )
    data = [(x.to(device=device, dtype=access.dtype if x.is_floating_point() else x.dtype), y.to(device))
            for x, y in (access.train, access.test)]
    weights = torch.ones(len(checkpoints), dtype=torch.float64) if eta is None else eta.double()
    scores = torch.zeros(n, m, dtype=torch.float64, device=device)
    for t, checkpoint in enumerate(checkpoints):
        state = load_state_dict(checkpoint)
        model.load_state_dict({k: v.to(access.dtype) if v.is_floating_point() else v for k, v in state.items()})
        train_g, test_g = (per_example_gradients(model, parameters, x, y, access.loss_fn, batch_size=batch_size)
                           for x, y in data)
        scores += float(weights[t]) * (train_g.double() @ test_g.double().T)
    return scores, torch.eye(m, dtype=torch.float64, device=device)
