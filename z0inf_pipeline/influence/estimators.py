"""Z0-Inf estimators in Gram form (see ../shared/z0inf-method.md).

g_i(t) = 1/|J| sum_{j in J} dl_i(j) dw_j / ||dw_j||^2 is never materialised: every inner
product of two such vectors reduces to a k x k kernel K_t built from the Gram matrix, so
after G the cost is O(T k^2 N) for self-influence and one (N x Tk) @ (Tk x M) GEMM for
train-test influence, independent of the model size D.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np
import torch

from ..errors import InputError
from .loss_tables import LossTable

NeighborRule = Literal["order", "distance"]
_DEGENERATE_RTOL = 1e-12
# Elements of an intermediate block: cache-friendly on a CPU, few kernel launches on a GPU.
_BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}


def _block_elements(device: torch.device) -> int:
    return _BLOCK_ELEMENTS.get(device.type, 1 << 24)


class DegenerateCheckpointWarning(UserWarning):
    """Two checkpoints coincide (||w_j - w_t|| = 0): that pair carries no direction and is left out."""


@dataclass(frozen=True)
class TopKInfluence:
    """Per test example, the k strongest proponents (largest INF) and opponents (smallest INF).

    Indices are positions in the training loss table; each array is (M, k), strongest first.
    """

    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor


def neighbor_indices(gram: torch.Tensor, neighbors: int, rule: NeighborRule = "order") -> torch.Tensor:
    """(T, k) neighbour sets: the k checkpoints nearest to t in training order, or in parameter distance.

    Ties go to the earlier checkpoint in both rules.
    """
    T = gram.shape[0]
    idx = torch.arange(T, device=gram.device)
    if rule == "order":
        key = (idx[None, :] - idx[:, None]).abs().to(torch.float64)
    elif rule == "distance":
        diag = gram.diagonal()
        key = diag[:, None] + diag[None, :] - 2 * gram
    else:
        raise InputError(f"neighbor_rule must be 'order' or 'distance', not {rule!r}")
    key = key.clone()
    key.fill_diagonal_(float("inf"))
    order = torch.sort(key, dim=1, stable=True).indices  # stable: equal keys keep index order
    return order[:, :neighbors]


def checkpoint_kernels(
    gram: torch.Tensor,
    neighbors: int = 2,
    eta: torch.Tensor | np.ndarray | list[float] | None = None,
    neighbor_rule: NeighborRule = "order",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour sets (T, k) and kernels K (T, k, k) with <g_i(t), g_z(t)> = D_i(t)^T K_t D_z(t).

    Degenerate neighbour pairs are left out (their rows and columns of K_t are zero and |J|
    counts only the rest), with a DegenerateCheckpointWarning.
    """
    gram = _check_gram(gram)
    T = gram.shape[0]
    if not isinstance(neighbors, int) or not 1 <= neighbors < T:
        raise InputError(f"neighbors must be an integer in [1, T-1] = [1, {T - 1}], got {neighbors!r}")
    weights = _check_eta(eta, T).to(gram.device)
    nbrs = neighbor_indices(gram, neighbors, neighbor_rule)
    t = torch.arange(T, device=gram.device)[:, None]
    g_tt = gram.diagonal()[:, None]
    g_ta = gram[t, nbrs]  # (T, k)
    g_ab = gram[nbrs[:, :, None], nbrs[:, None, :]]  # (T, k, k)
    inner = g_tt[:, :, None] - g_ta[:, :, None] - g_ta[:, None, :] + g_ab  # <dw_a, dw_b>
    sq = inner.diagonal(dim1=1, dim2=2)  # ||dw_a||^2
    valid = sq > _DEGENERATE_RTOL * gram.diagonal().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    if not valid.all():
        pairs = [(int(a), int(nbrs[a, b])) for a, b in (~valid).nonzero().tolist()]
        warnings.warn(
            f"{len(pairs)} neighbour pair(s) of identical checkpoints (t, j) = {pairs[:5]} left out",
            DegenerateCheckpointWarning,
            stacklevel=3,
        )
    inv = torch.where(valid, 1.0 / torch.where(valid, sq, 1.0), 0.0)
    count = valid.sum(dim=1).clamp_min(1).to(torch.float64)
    scale = weights / count**2
    kernels = inner * inv[:, :, None] * inv[:, None, :] * scale[:, None, None]
    return nbrs, kernels


def warmup_window(steps, warmup_fraction: float) -> np.ndarray:
    """Positions of the checkpoints at or after ``warmup_fraction`` of training (by step).

    The reference code never checkpoints the initialisation; leaving out the random start and the
    first transient (where every example's loss falls at once) keeps that shared movement from
    dominating the scores. 0 keeps every checkpoint. At least two checkpoints always stay: the
    last two, if the fraction would leave fewer.
    """
    steps = np.asarray(steps, dtype=np.float64).reshape(-1)
    if not 0.0 <= warmup_fraction < 1.0:
        raise InputError(f"warmup_fraction {warmup_fraction!r}: must be in [0, 1)")
    if len(steps) < 2:
        raise InputError(f"warmup_window: needs at least 2 checkpoints, got {len(steps)}")
    first, last = steps.min(), steps.max()
    keep = np.flatnonzero(steps >= first + warmup_fraction * (last - first))
    return keep if len(keep) >= 2 else np.arange(len(steps) - 2, len(steps))


def center_per_checkpoint(losses: torch.Tensor) -> torch.Tensor:
    """l_i(t) - mean_j l_j(t): the movement every example shares at a checkpoint removed (method note)."""
    return losses - losses.mean(dim=1, keepdim=True)


def trajectory_rank_factors(losses: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, T) standardised rank vectors of each example's loss trajectory, so that the Spearman
    correlation over checkpoints of examples i and z is the inner product of their rows.

    Ranks are taken over the T checkpoints of each example separately (ties: average rank). A
    constant trajectory has no ranking: its row is zero, so its correlation with anything is 0.
    """
    values = losses.to(dtype).T  # (n, T)
    order = values.argsort(dim=1, stable=True)
    ranks = torch.empty_like(values)
    positions = torch.arange(values.shape[1], dtype=dtype, device=values.device).expand_as(values)
    ranks.scatter_(1, order, positions)
    # ties: every member of a run of equal values gets the run's mean rank
    sorted_values = values.gather(1, order)
    new_run = torch.ones_like(sorted_values, dtype=torch.bool)
    new_run[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    run_id = new_run.cumsum(dim=1) - 1
    run_sum = torch.zeros_like(values).scatter_add_(1, run_id, positions)
    run_len = torch.zeros_like(values).scatter_add_(1, run_id, torch.ones_like(values))
    mean_rank = (run_sum / run_len.clamp_min(1)).gather(1, run_id)
    ranks.scatter_(1, order, mean_rank)
    centred = ranks - ranks.mean(dim=1, keepdim=True)
    norm = centred.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, centred / torch.where(norm > 0, norm, 1.0), 0.0)


def self_influence(
    gram: torch.Tensor,
    train_losses,
    neighbors: int = 2,
    eta=None,
    *,
    neighbor_rule: NeighborRule = "order",
    center_losses: bool = False,
) -> torch.Tensor:
    """SI(i) = sum_t eta_t ||g_i(t)||^2 for every training example: (T, N) losses -> (N,).

    ``center_losses``: the losses are centred per checkpoint first (``center_per_checkpoint``).
    """
    losses = _check_losses(train_losses, gram, "train_losses")
    if center_losses:
        losses = center_per_checkpoint(losses.to(_compute_dtype(losses)))
    nbrs, kernels = checkpoint_kernels(gram.to(losses.device), neighbors, eta, neighbor_rule)
    dtype = _compute_dtype(losses)
    kernels = kernels.to(dtype)
    N = losses.shape[1]
    out = torch.empty(N, dtype=dtype, device=losses.device)
    step = max(1, _block_elements(losses.device) // (losses.shape[0] * neighbors))
    for start in range(0, N, step):
        deltas = _deltas(losses[:, start : start + step], nbrs, dtype)  # (T, k, n)
        out[start : start + step] = (torch.bmm(kernels, deltas) * deltas).sum(dim=(0, 1))
    return out


def train_test_influence(
    gram: torch.Tensor,
    train_losses,
    test_losses,
    neighbors: int = 2,
    eta=None,
    *,
    neighbor_rule: NeighborRule = "order",
    center_losses: bool = False,
    weight_by_correlation: bool = False,
) -> torch.Tensor:
    """INF(i, z) = sum_t eta_t <g_i(t), g_z(t)>: the full (N, M) matrix, as one GEMM.

    ``center_losses``: train and test losses are each centred per checkpoint before the differences;
    ``weight_by_correlation``: INF(i, z) is multiplied by the Spearman correlation over checkpoints of
    the two (possibly centred) loss trajectories (see the method note).
    """
    features = influence_features(
        gram, train_losses, test_losses, neighbors, eta, neighbor_rule, center_losses, weight_by_correlation
    )
    return features.scores().T  # (N, M): a view of the test-major product


def train_test_topk(
    gram: torch.Tensor,
    train_losses,
    test_losses,
    k: int = 10,
    neighbors: int = 2,
    eta=None,
    *,
    neighbor_rule: NeighborRule = "order",
    block_size: int | None = None,
    tile_rows: int | None = None,
    center_losses: bool = False,
    weight_by_correlation: bool = False,
) -> TopKInfluence:
    """Top-k proponents and opponents of every test example, a tile of INF at a time.

    A tile is ``block_size`` test examples by ``tile_rows`` training examples; each tile's own top k
    is merged into a running top k per test example. The full N x M matrix never exists, and a tile
    small enough to stay in cache is selected from while still there: selecting from a slice of all
    N training examples read it back from memory twice (largest, smallest), which cost more than
    the product itself. Options as in ``train_test_influence``.
    """
    features = influence_features(
        gram, train_losses, test_losses, neighbors, eta, neighbor_rule, center_losses, weight_by_correlation
    )
    return topk_of_factors(features, k, block_size=block_size, tile_rows=tile_rows)


def topk_of_factors(
    features: "InfluenceFactors", k: int, *, block_size: int | None = None, tile_rows: int | None = None
) -> TopKInfluence:
    """Top-k proponents and opponents of every test example of INF = ``features``, tile by tile
    (see ``train_test_topk``): any estimator in factor form (trajectory, random directions, both)."""
    return topk_of_factor_chunks([features], k, features.train.shape[0], block_size=block_size, tile_rows=tile_rows)


def topk_of_factor_chunks(
    chunks: Iterable["InfluenceFactors"],
    k: int,
    train_examples: int,
    *,
    block_size: int | None = None,
    tile_rows: int | None = None,
) -> TopKInfluence:
    """``topk_of_factors`` for training rows that arrive in consecutive chunks (each chunk's ``train`` holds
    its rows, its ``test`` every test example), read one at a time: only one chunk and the running top k
    per test example are held, so the N x r training factors never exist whole (the pipeline's
    projection shards). Each block of test examples meets the tiles in training order, so when every
    chunk but the last is a whole number of tiles the tiles are the same products, merged in the same
    order, as one chunk of all ``train_examples`` rows: the same numbers."""
    N = train_examples
    if not isinstance(k, int) or not 1 <= k <= N:
        raise InputError(f"k must be an integer in [1, {N}] (the number of training examples), got {k!r}")
    for name, value in (("block_size", block_size), ("tile_rows", tile_rows)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    best: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # test block start -> (largest, smallest)
    offset, block, rows, device, dtype = 0, 1, k, torch.device("cpu"), torch.float32
    for features in chunks:
        if offset == 0:  # tiles sized once, from the test examples and the device
            M, device, dtype = features.test.shape[0], features.train.device, features.train.dtype
            elements = _TOPK_TILE_ELEMENTS.get(device.type, _TOPK_TILE_ELEMENTS["cpu"])
            block = block_size or min(max(M, 1), _TOPK_TEST_BLOCK.get(device.type, _TOPK_TEST_BLOCK["cpu"]))
            rows = max(k, tile_rows or elements // block)  # a tile holds at least k candidates
        for start in range(0, features.test.shape[0], block):
            best[start] = _block_topk(features, slice(start, start + block), rows, k, offset, best.get(start))
        offset += features.train.shape[0]
        del features  # the next chunk is read without this one beside it
    if offset != N:
        raise InputError(f"the chunks of training factors hold {offset} training examples, not {N}")
    if not best:
        empty_i = torch.empty(0, k, dtype=torch.long, device=device)
        empty_v = torch.empty(0, k, dtype=dtype, device=device)
        return TopKInfluence(empty_i, empty_v, empty_i, empty_v)
    (top_v, top_i), (bottom_v, bottom_i) = (
        tuple(torch.cat(part) for part in zip(*(best[start][side] for start in sorted(best)))) for side in (0, 1)
    )
    return TopKInfluence(top_i, top_v, bottom_i, bottom_v)


# Top-k tiles: on a CPU a tile of INF (float32) that stays in cache; on a GPU few, large launches.
_TOPK_TILE_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}
_TOPK_TEST_BLOCK = {"cpu": 64, "cuda": 4096}


def _block_topk(
    features: "InfluenceFactors", columns: slice, rows: int, k: int, offset: int, best
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Top and bottom k of one block of test examples, updated with the chunk's training rows tile by
    tile: [(values, indices) of the largest, of the smallest], indices counted from the first chunk."""
    for first in range(0, features.train.shape[0], rows):
        scores = features.scores(columns, slice(first, first + rows))  # (b, n), one row per test example
        kk = min(k, scores.shape[1])
        tile = [scores.topk(kk, dim=1, largest=largest) for largest in (True, False)]
        tile = [(t.values, t.indices + (offset + first)) for t in tile]
        if best:
            tile = [_merge_topk(b, t, k, largest) for b, t, largest in zip(best, tile, (True, False))]
        best = tile
    return best


def _merge_topk(best, tile, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest (or smallest) of two candidate sets (values, global indices), strongest first."""
    values, indices = torch.cat([best[0], tile[0]], dim=1), torch.cat([best[1], tile[1]], dim=1)
    chosen = values.topk(k, dim=1, largest=largest)
    return chosen.values, indices.gather(1, chosen.indices)


def variance_self_influence(train_losses) -> torch.Tensor:
    """SIvar(i): the variance of l_i(t) over checkpoints; needs no checkpoints at all."""
    losses = _as_tensor(train_losses, "train_losses")
    if losses.ndim != 2 or losses.shape[0] < 2:
        raise InputError(f"train_losses: expected a (T >= 2, N) table, got shape {tuple(losses.shape)}")
    _check_finite(losses, "train_losses")
    return losses.to(_compute_dtype(losses)).var(dim=0, correction=0)


@dataclass(frozen=True)
class InfluenceFactors:
    """INF = train @ test^T (an estimator in factor form), optionally times rho = train_ranks @ test_ranks^T elementwise: two
    low-rank products, so any block of test columns is formed without the N x M matrix."""

    train: torch.Tensor  # (N, Tk)
    test: torch.Tensor  # (M, Tk)
    train_ranks: torch.Tensor | None  # (N, T) standardised rank vectors, or None (no correlation weight)
    test_ranks: torch.Tensor | None

    def scores(self, columns: slice = slice(None), rows: slice = slice(None)) -> torch.Tensor:
        """INF (times rho) of the test examples in ``columns`` with the training examples in ``rows``:
        (b, n), one row per test example, the layout top-k selects along."""
        scores = self.test[columns] @ self.train[rows].T
        if self.train_ranks is not None:
            scores *= self.test_ranks[columns] @ self.train_ranks[rows].T
        return scores


def test_example_spread(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """(M,) standard deviation over training examples of each test example's scores train @ test^T, from
    the factors' (r x r) covariance: sigma_z^2 = b_z^T Cov(A) b_z, never the N x M matrix."""
    centred = train - train.mean(dim=0)
    covariance = centred.T @ centred / max(len(train), 1)
    return ((test @ covariance) * test).sum(dim=1).clamp_min(0).sqrt()


def combine_standardised(first: InfluenceFactors, second: InfluenceFactors, weight: float) -> InfluenceFactors:
    """first / sigma_first(z) + weight * second / sigma_second(z): two estimators of INF(i, z) on
    different scales (random directions in TracIn's units, the trajectory in Z0's), each divided by the
    spread of its scores over the training examples of the same test example z before they are added,
    so ``weight`` is the share of the vote and not a unit conversion. Ranks within a test example (what
    top-k and LDS read) depend only on ``weight``. A test example whose scores are all equal under one
    estimator takes nothing from it. Factor form: [A1 | A2] @ [B1 / s1 | w B2 / s2]^T."""
    if first.train_ranks is not None or second.train_ranks is not None:
        raise InputError("combine_standardised: correlation-weighted factors cannot be added to others")
    parts = []
    for factors, scale in ((first, 1.0), (second, weight)):
        spread = test_example_spread(factors.train, factors.test)
        parts.append((factors.train, factors.test * (scale / torch.where(spread > 0, spread, torch.inf))[:, None]))
    dtype = torch.promote_types(parts[0][0].dtype, parts[1][0].dtype)
    return InfluenceFactors(torch.cat([a.to(dtype) for a, _ in parts], dim=1),
                            torch.cat([b.to(dtype) for _, b in parts], dim=1), None, None)


def influence_features(
    gram, train_losses, test_losses, neighbors, eta, neighbor_rule, center_losses=False, weight_by_correlation=False
) -> InfluenceFactors:
    """A = [Dtr_1 K_1 | ... | Dtr_T K_T] (N, Tk) and B = [Dte_1 | ... | Dte_T] (M, Tk), so INF = A B^T."""
    train = _check_losses(train_losses, gram, "train_losses")
    test = _check_losses(test_losses, gram, "test_losses").to(train.device)
    nbrs, kernels = checkpoint_kernels(gram.to(train.device), neighbors, eta, neighbor_rule)
    dtype = torch.promote_types(_compute_dtype(train), _compute_dtype(test))
    if center_losses:
        train, test = center_per_checkpoint(train.to(dtype)), center_per_checkpoint(test.to(dtype))
    d_train = _deltas(train, nbrs, dtype)  # (T, k, N)
    d_test = _deltas(test, nbrs, dtype)
    weighted = torch.bmm(kernels.to(dtype), d_train)  # K symmetric: (D^T K)^T = K D
    train_features = weighted.permute(2, 0, 1).reshape(train.shape[1], -1)
    test_features = d_test.permute(2, 0, 1).reshape(test.shape[1], -1)
    if not weight_by_correlation:
        return InfluenceFactors(train_features, test_features, None, None)
    return InfluenceFactors(
        train_features, test_features, trajectory_rank_factors(train, dtype), trajectory_rank_factors(test, dtype)
    )


def _deltas(losses: torch.Tensor, nbrs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dl(j) = l(j) - l(t) for each checkpoint t and neighbour j: (T, k, n)."""
    losses = losses.to(dtype)
    return losses[nbrs] - losses[:, None, :]


def _compute_dtype(losses: torch.Tensor) -> torch.dtype:
    """float64 inputs stay float64; anything narrower is computed in float32."""
    return torch.float64 if losses.dtype == torch.float64 else torch.float32


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, LossTable):
        x = x.values
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"{name}: expected a floating-point (T, N) tensor, array or LossTable, got {type(x).__name__}")
    return x


def _check_finite(x: torch.Tensor, name: str) -> None:
    finite = torch.isfinite(x)
    if not finite.all():
        t, i = (~finite).nonzero()[0].tolist()
        raise InputError(
            f"{name}: {int((~finite).sum())} NaN/inf value(s) (first at checkpoint row {t}, example column {i})"
        )


def _check_gram(gram) -> torch.Tensor:
    if not isinstance(gram, torch.Tensor) or gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise InputError(f"gram: expected a square (T, T) tensor, got {getattr(gram, 'shape', type(gram))}")
    if gram.shape[0] < 2:
        raise InputError(f"gram: Z0-Inf needs at least 2 checkpoints, got {gram.shape[0]}")
    if not torch.isfinite(gram).all():
        raise InputError("gram: holds NaN or inf values")
    return gram.to(torch.float64)


def _check_losses(losses, gram, name: str) -> torch.Tensor:
    losses = _as_tensor(losses, name)
    if losses.ndim != 2:
        raise InputError(f"{name}: expected a (T, N) table, got shape {tuple(losses.shape)}")
    if losses.shape[0] != gram.shape[0]:
        raise InputError(
            f"{name}: has {losses.shape[0]} checkpoint rows but the Gram matrix is for {gram.shape[0]} checkpoints"
        )
    _check_finite(losses, name)
    return losses


def _check_eta(eta, T: int) -> torch.Tensor:
    if eta is None:
        return torch.ones(T, dtype=torch.float64)
    weights = torch.as_tensor(eta, dtype=torch.float64).reshape(-1)
    if weights.shape != (T,):
        raise InputError(f"eta: expected {T} per-checkpoint weights, got {weights.numel()}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise InputError(f"eta: weights must be finite and >= 0, got {weights.tolist()}")
    return weights
