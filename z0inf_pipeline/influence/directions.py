"""Random directions: train-test influence beyond what the trajectory can see, from forward passes only.

The trajectory gives each checkpoint only k directions w_j - w_t, so the Z0 gradient g_i(t) is the
gradient projected on a k-dimensional span that the mean gradient dominates. Here every example's
gradient is also projected on P random directions u_p (Rademacher or Gaussian over the chosen
parameters, so E[u u^T] = I), by two-sided finite differences of its loss:

    s_{i,p}(t) = (l_i(w_t + eps u_p) - l_i(w_t - eps u_p)) / (2 eps)  ~  <grad l_i(w_t), u_p>

and INF(i, z) = sum_t eta_t (1/P) sum_p s_{i,p}(t) s_{z,p}(t), an unbiased estimate of TracIn's
sum_t eta_t <grad l_i(w_t), grad l_z(w_t)> with error ~ ||grad l_i|| ||grad l_z|| / sqrt(P) (SPSA /
MeZO's idea, applied to attribution). The SAME u_p serve train and test (common random numbers).

Why finite differences and not forward-mode ``torch.func.jvp`` (also forward-only, and exact): a
difference of two losses needs nothing from the loss or the model but its value, the contract of
everything else in Z0-Inf (a 0-1 error or a black-box scorer work, and so does any layer without a
forward-AD formula). The step is relative to the weights' scale, and the float32 rounding of the
difference is checked (a warning names the step when it is too small); in float64 the projections
match autograd's to 1e-6 (tests/influence/test_directions.py).

Memory: the model, the directions of one pass and a copy of the chosen weights (O(D)), one batch of
activations, and the (N + M) x P projections: never N x D, never a stored direction (each is regenerated
from ``(seed, step, p)``, once per batch of examples). Cost: 2 P forward passes over the N + M examples
per checkpoint used; with a parameter subset (``--parameters``, e.g. the head) only the modules from the
first perturbed one on run per direction (``frozen_prefix``): the rest runs once per batch.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .checkpoints import Checkpoint, load_state_dict
from ..errors import InputError
from .loss_tables import LossFn

Distribution = str  # "rademacher" | "gaussian" (validated by TrainTestArguments)
DISTRIBUTIONS = ("rademacher", "gaussian")
# Below this share of float32 resolution in |l(w + eps u) - l(w - eps u)|, the difference is mostly rounding.
_ROUNDING_FLOOR = 64 * torch.finfo(torch.float32).eps


# Examples per batched forward pass of ``direction_features``: a shard of the examples that starts on a
# multiple of it is evaluated in the same batches as the whole set, so its projections are the same bits.
DIRECTION_BATCH = 4096


class FiniteDifferenceRoundingWarning(UserWarning):
    """The loss differences along the random directions are close to float32 rounding: raise ``step_size``
    (or evaluate in float64) for a meaningful estimate."""


@dataclass(frozen=True)
class ForwardAccess:
    """What forward passes need beyond the loss tables: a model factory (the run's architecture, random
    weights; checkpoints are loaded into it), the train and test inputs with their targets, in the loss
    tables' example order, and the per-example loss. Runs without one fall back to the trajectory."""

    model_factory: Callable[[], torch.nn.Module]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    loss_fn: LossFn
    dtype: torch.dtype = torch.float32
    # directions per batched forward pass (vmap over the perturbed weights); None: 1 on a CPU, where vmap's
    # batched convolutions and GPT-2's scaled_dot_product_attention (no batching rule) are slower than one
    # direction at a time (CNN of the suite 2.6x, GPT-2 2x; a small MLP is 1.3x faster at 8), 8 on a GPU,
    # where one call's launch overhead is what a tiny model costs (benchmarks/gpu_attribution.py)
    directions_per_pass: int | None = None


def direction(
    shapes: Mapping[str, torch.Size], seed: int, step: int, index: int, distribution: Distribution = "rademacher"
) -> dict[str, torch.Tensor]:
    """Direction u_p at checkpoint ``step``, one tensor per parameter: regenerated from (seed, step, p)
    on the CPU (the same numbers on any device), never stored."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0]))
    out = {}
    for name, shape in shapes.items():
        if distribution == "rademacher":
            out[name] = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).mul_(2).sub_(1)
        elif distribution == "gaussian":
            out[name] = torch.randn(shape, generator=generator)
        else:
            raise InputError(f"distribution must be one of {list(DISTRIBUTIONS)}, not {distribution!r}")
    return out


class PrefixReuseWarning(UserWarning):
    """The modules computed before the first perturbed parameter turned out to depend on it (a parameter
    used outside the module that owns it): every direction runs the whole model instead."""


def _forward_with_hooks(model: torch.nn.Module, inputs: torch.Tensor, handles: Sequence) -> None:
    """One forward pass of ``inputs`` without gradients, for what the hooks behind ``handles`` record; the
    hooks are removed afterwards, whatever happens."""
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()


def frozen_prefix(model: torch.nn.Module, parameters: Sequence[str], inputs: torch.Tensor) -> list[torch.nn.Module]:
    """The largest modules that finish before any module owning a chosen parameter starts, called once per
    forward pass: their outputs do not depend on the perturbation, so one pass per batch serves every
    direction (with ``--parameters`` the head, only the head runs per direction). Found by running
    ``inputs`` (a couple of examples) once with hooks that record the order of calls; [] when a chosen
    parameter is never used through its module."""
    chosen = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in set(parameters)}
    owners = {m for m in model.modules() if any(id(p) in chosen for p in m._parameters.values() if p is not None)}
    clock, starts, ends, calls = iter(range(1 << 62)), {}, {}, {}

    def before(module, args):
        starts.setdefault(module, next(clock))
        calls[module] = calls.get(module, 0) + 1

    def after(module, args, output):
        ends[module] = next(clock)

    _forward_with_hooks(model, inputs, [h for m in model.modules()
                                        for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))])
    if not owners <= starts.keys():
        return []
    first_use = min(starts[m] for m in owners)
    frozen = [m for m in model.modules() if m is not model and calls.get(m) == 1 and ends[m] < first_use]
    inside = {id(sub) for m in frozen for sub in m.modules() if sub is not m}
    return [m for m in frozen if id(m) not in inside]


class _ReplayedPrefix:
    """Within the block, each module of ``prefix`` returns the output it gave for ``inputs`` at the current
    weights instead of computing it (an instance ``forward`` in front of the class's)."""

    def __init__(self, model: torch.nn.Module, prefix: Sequence[torch.nn.Module], inputs: torch.Tensor) -> None:
        self.prefix, outputs = list(prefix), {}
        _forward_with_hooks(model, inputs, [m.register_forward_hook(
            lambda module, args, output: outputs.__setitem__(module, output)) for m in self.prefix])
        self.outputs = outputs

    def __enter__(self):
        for module in self.prefix:
            module.forward = lambda *args, _output=self.outputs[module], **kwargs: _output
        return self

    def __exit__(self, *exc):
        for module in self.prefix:
            del module.forward


def direction_projections(
    model: torch.nn.Module,
    parameters: Sequence[str],
    datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    *,
    directions: int,
    step_size: float,
    seed: int = 0,
    step: int = 0,
    distribution: Distribution = "rademacher",
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    directions_per_pass: int = 1,
    reuse_prefix: bool = True,
) -> list[torch.Tensor]:
    """s_{i,p} for every example of each (inputs, targets) dataset at the model's current weights: one
    (n, P) float64 tensor per dataset, all from the same P directions over ``parameters``.

    eps = ``step_size`` x the RMS of the chosen weights (a relative step: the same setting suits a
    logistic regression and a transformer). ``directions_per_pass`` directions, both signs, go through
    one batched forward pass (``torch.func.functional_call`` under ``vmap`` over the perturbed weights),
    ``batch_size`` examples at a time: the tiny models of a suite are bound by per-call overhead, not
    arithmetic. Batches are the outer loop, so with ``reuse_prefix`` the modules that run before the first
    perturbed parameter (``frozen_prefix``) run once per batch, not once per direction: the same numbers,
    checked once against the whole model along one direction. Directions are regenerated per batch. The
    model's own weights are never modified.
    """
    if directions < 1:
        raise InputError(f"directions={directions!r} must be at least 1")
    if not step_size > 0:
        raise InputError(f"step_size={step_size!r} must be positive")
    named = {name: p.detach() for name, p in model.named_parameters()}
    missing = [name for name in parameters if name not in named]
    if missing or not parameters:
        raise InputError(f"parameters {missing or list(parameters)}: not parameters of the model "
                                  f"(it has {sorted(named)[:8]}...)")
    chosen = {name: named[name] for name in parameters}
    fixed = {**{n: p for n, p in named.items() if n not in chosen}, **dict(model.named_buffers())}
    flat = torch.cat([w.reshape(-1).double() for w in chosen.values()])
    eps = step_size * (float(flat.pow(2).mean().sqrt()) or 1.0)
    shapes = {name: p.shape for name, p in chosen.items()}

    def losses(weights: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs = torch.func.functional_call(model, {**fixed, **weights}, (inputs,))
        return loss_fn(outputs, targets)

    def perturbed(first: int, count: int) -> dict[str, torch.Tensor]:
        """Directions first .. first + count - 1 applied to the chosen weights, (2 count, *shape) each:
        plus, then minus."""
        us = [direction(shapes, seed, step, p, distribution) for p in range(first, first + count)]
        weights = {}
        for name, w in chosen.items():
            u = torch.stack([d[name] for d in us]).to(device=device, dtype=w.dtype)
            weights[name] = torch.cat([w + eps * u, w - eps * u])
        return weights

    batched = torch.vmap(losses, in_dims=(0, None, None))
    out = [torch.empty(len(targets), directions, dtype=torch.float64) for _, targets in datasets]
    relative = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe = next((x for x, y in datasets if len(y)), None)
            prefix = frozen_prefix(model, list(chosen), probe[:2]) if reuse_prefix and probe is not None else []
            checked = False
            for k, (inputs, targets) in enumerate(datasets):
                for start in range(0, len(targets), batch_size):
                    rows = slice(start, start + batch_size)
                    if prefix and not checked:
                        checked = True
                        if not _prefix_agrees(model, prefix, losses, perturbed(0, 1), inputs[rows], targets[rows]):
                            warnings.warn(
                                "the modules before the first perturbed parameter depend on it (a parameter used "
                                "outside its module?): running the whole model for every direction",
                                PrefixReuseWarning, stacklevel=2,
                            )
                            prefix = []
                    with _ReplayedPrefix(model, prefix, inputs[rows]) if prefix else contextlib.nullcontext():
                        for first in range(0, directions, directions_per_pass):
                            count = min(directions_per_pass, directions - first)
                            both = batched(perturbed(first, count), inputs[rows], targets[rows]).double()  # (2B, n)
                            if both.shape[1:] != targets[rows].shape[:1]:
                                raise InputError(
                                    f"loss_fn returned shape {tuple(both.shape[1:])} for a batch of "
                                    f"{len(targets[rows])} examples; it must return one value per example (for "
                                    "example reduction='none')"
                                )
                            plus, minus = both[:count], both[count:]
                            out[k][rows, first : first + count] = ((plus - minus) / (2 * eps)).T.cpu()
                            relative.append(float(((plus - minus).abs() / plus.abs().clamp_min(1e-30)).median()))
    finally:
        model.train(was_training)
    if next(iter(chosen.values())).dtype == torch.float32 and relative and np.median(relative) < _ROUNDING_FLOOR:
        warnings.warn(
            f"step_size={step_size}: the median loss difference along a direction is {np.median(relative):.2g} of "
            f"the loss, near float32 rounding ({torch.finfo(torch.float32).eps:.1g}); raise step_size",
            FiniteDifferenceRoundingWarning,
            stacklevel=2,
        )
    return out


def _prefix_agrees(model, prefix, losses, weights, inputs, targets) -> bool:
    """The loss difference along one direction (``weights``: plus, then minus) is the same with the prefix
    replayed as through the whole model, to float rounding: a prefix that depended on a chosen parameter
    would lose part of it."""
    plus, minus = ({name: w[i] for name, w in weights.items()} for i in (0, 1))
    whole = losses(plus, inputs, targets).double() - losses(minus, inputs, targets).double()
    with _ReplayedPrefix(model, prefix, inputs):
        replayed = losses(plus, inputs, targets).double() - losses(minus, inputs, targets).double()
    return bool(torch.allclose(replayed, whole, rtol=1e-3, atol=1e-3 * float(whole.abs().max()) + 1e-30))


def direction_features(
    access: ForwardAccess,
    checkpoints: Sequence[Checkpoint],
    parameters: Sequence[str],
    eta: torch.Tensor | None,
    *,
    directions: int,
    step_size: float,
    seed: int = 0,
    distribution: Distribution = "rademacher",
    device: str | torch.device = "cpu",
    batch_size: int = DIRECTION_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A B^T = sum_t eta_t (1/P) S_train(t) S_test(t)^T over ``checkpoints``:
    A = [eta_t / P S_train(t)]_t (N, C P), B = [S_test(t)]_t (M, C P), float64 on the CPU."""
    model = access.model_factory().to(device=device, dtype=access.dtype)
    trainable = dict(model.named_parameters())
    parameters = [name for name in parameters if name in trainable]  # buffers (running statistics) stay put
    data = [(x.to(device=device, dtype=access.dtype if x.is_floating_point() else x.dtype), y.to(device))
            for x, y in (access.train, access.test)]
    weights = torch.ones(len(checkpoints), dtype=torch.float64) if eta is None else eta.double()
    train_parts, test_parts = [], []
    for t, checkpoint in enumerate(checkpoints):
        state = load_state_dict(checkpoint)
        model.load_state_dict({k: v.to(access.dtype) if v.is_floating_point() else v for k, v in state.items()})
        train_s, test_s = direction_projections(
            model, parameters, data, access.loss_fn, directions=directions, step_size=step_size, seed=seed,
            step=checkpoint.step, distribution=distribution, device=device, batch_size=batch_size,
            directions_per_pass=access.directions_per_pass or (8 if torch.device(device).type == "cuda" else 1),
        )
        train_parts.append(train_s * (float(weights[t]) / directions))
        test_parts.append(test_s)
        if progress is not None:
            progress(t + 1, len(checkpoints))
    return torch.cat(train_parts, dim=1), torch.cat(test_parts, dim=1)


def direction_checkpoint_positions(window: np.ndarray, count: int) -> np.ndarray:
    """``count`` positions spread evenly over the window, always its last checkpoint (the trained model)."""
    if count < 1:
        raise InputError(f"direction_checkpoints={count!r} must be at least 1")
    if count >= len(window):
        return np.asarray(window)
    picks = np.floor(np.linspace(len(window) - 1, 0, count, endpoint=False) + 0.5).astype(int)
    return np.asarray(window)[np.unique(picks)]
