"""The Gram form against a brute-force, materialised g_i(t) (the method note's definition)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from z0inf_pipeline.influence import (
    DegenerateCheckpointWarning,
    InfluenceInputError,
    gram_matrix,
    self_influence,
    train_test_influence,
    train_test_topk,
    variance_self_influence,
)

from .conftest import SHAPES, flatten


def brute_neighbors(W: np.ndarray, k: int, rule: str) -> list[list[int]]:
    T = W.shape[0]
    out = []
    for t in range(T):
        others = [j for j in range(T) if j != t]
        if rule == "order":
            key = lambda j: (abs(j - t), j)  # noqa: E731
        else:
            key = lambda j: (float(((W[j] - W[t]) ** 2).sum()), j)  # noqa: E731
        out.append(sorted(others, key=key)[:k])
    return out


def brute_g(W: np.ndarray, L: np.ndarray, nbrs: list[list[int]]) -> np.ndarray:
    """g[t, i, :] = 1/|J| sum_j (l_i(j) - l_i(t)) dw_j / ||dw_j||^2, with D-dimensional vectors."""
    T, N = L.shape
    g = np.zeros((T, N, W.shape[1]))
    for t in range(T):
        for j in nbrs[t]:
            dw = W[j] - W[t]
            g[t] += np.outer(L[j] - L[t], dw / dw.dot(dw))
        g[t] /= len(nbrs[t])
    return g


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("T, k", [(2, 1), (3, 1), (3, 2), (7, 1), (7, 2), (7, 4)])
@pytest.mark.parametrize("rule", ["order", "distance"])
@pytest.mark.parametrize("with_eta", [False, True])
def test_gram_form_matches_materialised_estimator(T, k, rule, with_eta):
    rng = np.random.default_rng(T * 100 + k)
    W = rng.normal(size=(T, 37)) * rng.uniform(0.1, 3.0, size=(T, 1)) + 5.0  # offset: exercises centring
    L, Lz = rng.uniform(0, 3, size=(T, 11)), rng.uniform(0, 3, size=(T, 4))
    eta = rng.uniform(0.1, 2.0, size=T) if with_eta else np.ones(T)
    nbrs = brute_neighbors(W, k, rule)
    g, gz = brute_g(W, L, nbrs), brute_g(W, Lz, nbrs)
    want_si = np.einsum("t,tnd,tnd->n", eta, g, g)
    want_inf = np.einsum("t,tnd,tmd->nm", eta, g, gz)

    G = gram_matrix(torch.from_numpy(W))
    arg_eta = torch.from_numpy(eta) if with_eta else None
    si = self_influence(G, torch.from_numpy(L), k, arg_eta, neighbor_rule=rule)
    inf = train_test_influence(G, torch.from_numpy(L), torch.from_numpy(Lz), k, arg_eta, neighbor_rule=rule)
    assert si.dtype == torch.float64
    assert rel_err(si, want_si) < 1e-9
    assert rel_err(inf, want_inf) < 1e-9
    # without centring too (the raw W W^T of the method note)
    raw = self_influence(gram_matrix(torch.from_numpy(W), center=False), torch.from_numpy(L), k, arg_eta, neighbor_rule=rule)
    assert rel_err(raw, want_si) < 1e-9


@pytest.mark.parametrize("patterns", [None, ["head.*"], ["encoder.weight", "head.bias"]])
def test_parameter_subsets_from_files_match_materialised(checkpoint_dir, patterns):
    folder, states = checkpoint_dir(T=5)
    names = [n for n in SHAPES if patterns is None or any(__import__("fnmatch").fnmatch(n, p) for p in patterns)]
    W = torch.stack([flatten(s, names) for s in states]).numpy()
    rng = np.random.default_rng(1)
    L, Lz = rng.uniform(0, 2, size=(5, 9)), rng.uniform(0, 2, size=(5, 3))
    nbrs = brute_neighbors(W, 2, "order")
    g, gz = brute_g(W, L, nbrs), brute_g(W, Lz, nbrs)
    G = gram_matrix(folder, parameters=patterns, max_elements=7)  # tiny slices: every tensor is split
    assert rel_err(self_influence(G, torch.from_numpy(L)), np.einsum("tnd,tnd->n", g, g)) < 1e-9
    got = train_test_influence(G, torch.from_numpy(L), torch.from_numpy(Lz))
    assert rel_err(got, np.einsum("tnd,tmd->nm", g, gz)) < 1e-9


def test_linear_loss_recovers_gradient_projection_on_neighbour_span():
    """l_i(w) = <x_i, w>: the true gradient is x_i. Checkpoints walk a staircase, one new axis
    per step, so the two neighbour directions of every interior checkpoint are orthogonal
    and g_i(t) = P_t x_i / 2 exactly, with P_t the projection on axes t-1 and t."""
    T, D, N = 6, 9, 8
    rng = np.random.default_rng(0)
    steps = rng.uniform(0.5, 2.0, size=T - 1)
    W = np.zeros((T, D))
    for t in range(1, T):
        W[t] = W[t - 1]
        W[t, t - 1] += steps[t - 1]
    X = rng.normal(size=(N, D))
    L = W @ X.T  # (T, N)
    eta = np.ones(T)
    eta[[0, T - 1]] = 0.0  # endpoints have non-orthogonal one-sided neighbours
    si = self_influence(gram_matrix(torch.from_numpy(W)), torch.from_numpy(L), 2, torch.from_numpy(eta))
    want = sum((X[:, t - 1] ** 2 + X[:, t] ** 2) / 4 for t in range(1, T - 1))
    assert rel_err(si, want) < 1e-9
    Z = rng.normal(size=(3, D))
    inf = train_test_influence(gram_matrix(torch.from_numpy(W)), torch.from_numpy(L), torch.from_numpy(W @ Z.T), 2, torch.from_numpy(eta))
    want_inf = sum(np.outer(X[:, t - 1], Z[:, t - 1]) + np.outer(X[:, t], Z[:, t]) for t in range(1, T - 1)) / 4
    assert rel_err(inf, want_inf) < 1e-9


@pytest.mark.parametrize("block_size", [1, 3, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_topk_equals_topk_of_full_matrix(block_size, dtype):
    gen = torch.Generator().manual_seed(3)
    T, N, M, k = 8, 50, 13, 5
    G = gram_matrix(torch.randn(T, 20, generator=gen, dtype=torch.float64))
    L, Lz = torch.rand(T, N, generator=gen, dtype=dtype), torch.rand(T, M, generator=gen, dtype=dtype)
    full = train_test_influence(G, L, Lz, 3).T  # (M, N)
    top = train_test_topk(G, L, Lz, k=k, neighbors=3, block_size=block_size)
    assert top.proponents.shape == (M, k)
    assert torch.equal(top.proponents, full.topk(k, dim=1).indices)
    assert torch.equal(top.opponents, full.topk(k, dim=1, largest=False).indices)
    torch.testing.assert_close(top.proponent_scores, full.topk(k, dim=1).values)
    torch.testing.assert_close(top.opponent_scores, full.topk(k, dim=1, largest=False).values)


def test_float32_tables_agree_with_float64():
    gen = torch.Generator().manual_seed(4)
    G = gram_matrix(torch.randn(10, 30, generator=gen, dtype=torch.float64))
    L = torch.rand(10, 200, generator=gen, dtype=torch.float64)
    si64 = self_influence(G, L)
    si32 = self_influence(G, L.float())
    assert si32.dtype == torch.float32
    assert rel_err(si32, si64) < 1e-4


def test_variance_estimator_is_population_variance_over_checkpoints():
    L = np.random.default_rng(5).uniform(size=(7, 12))
    assert rel_err(variance_self_influence(torch.from_numpy(L)), L.var(axis=0)) < 1e-12


def test_identical_checkpoints_are_left_out_with_a_warning():
    W = np.random.default_rng(6).normal(size=(5, 10))
    W[2] = W[1]
    L = np.random.default_rng(7).uniform(size=(5, 6))
    with pytest.warns(DegenerateCheckpointWarning, match="identical checkpoints"):
        si = self_influence(gram_matrix(torch.from_numpy(W)), torch.from_numpy(L), 2)
    assert torch.isfinite(si).all()
    # brute force with the degenerate neighbour dropped from each set
    nbrs = [[j for j in n if not np.array_equal(W[j], W[t])] for t, n in enumerate(brute_neighbors(W, 2, "order"))]
    g = brute_g(W, L, nbrs)
    assert rel_err(si, np.einsum("tnd,tnd->n", g, g)) < 1e-9


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda G, L: self_influence(G, torch.where(L > 0.5, float("nan"), L)), "train_losses: .*NaN/inf"),
        (lambda G, L: self_influence(G, L.clone().fill_(float("inf"))), "train_losses: .*NaN/inf"),
        (lambda G, L: train_test_influence(G, L, L[:, :3].clone().fill_(float("nan"))), "test_losses: .*NaN/inf"),
        (lambda G, L: self_influence(G, L, neighbors=4), r"neighbors must be an integer in \[1, T-1\]"),
        (lambda G, L: self_influence(G, L, neighbors=0), "neighbors must be"),
        (lambda G, L: self_influence(G[:1, :1], L[:1]), "at least 2 checkpoints"),
        (lambda G, L: self_influence(G, L[:3]), "train_losses: has 3 checkpoint rows but the Gram matrix is for 4"),
        (lambda G, L: self_influence(G, L, eta=[1.0, -1.0, 1.0, 1.0]), "eta: weights must be finite and >= 0"),
        (lambda G, L: self_influence(G, L, eta=[1.0, 1.0]), "eta: expected 4"),
        (lambda G, L: train_test_topk(G, L, L, k=0), "k must be an integer"),
        (lambda G, L: self_influence(G, L, neighbor_rule="random"), "neighbor_rule"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    gen = torch.Generator().manual_seed(8)
    G = gram_matrix(torch.randn(4, 6, generator=gen, dtype=torch.float64))
    L = torch.rand(4, 10, generator=gen, dtype=torch.float64)
    with pytest.raises(InfluenceInputError, match=message):
        call(G, L)
