"""The Gram form against a brute-force, materialised g_i(t) (the method note's definition)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence import (
    DegenerateCheckpointWarning,
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
@pytest.mark.parametrize("tile_rows", [None, 7])  # 7: tiles of 7 training examples, the last one of 1 < k
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_topk_equals_topk_of_full_matrix(block_size, tile_rows, dtype):
    gen = torch.Generator().manual_seed(3)
    T, N, M, k = 8, 50, 13, 5
    G = gram_matrix(torch.randn(T, 20, generator=gen, dtype=torch.float64))
    L, Lz = torch.rand(T, N, generator=gen, dtype=dtype), torch.rand(T, M, generator=gen, dtype=dtype)
    full = train_test_influence(G, L, Lz, 3).T  # (M, N)
    top = train_test_topk(G, L, Lz, k=k, neighbors=3, block_size=block_size, tile_rows=tile_rows)
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
    with pytest.raises(InputError, match=message):
        call(G, L)


# ---------------------------------------------------------------------------------------------
# Options of the reference code: checkpoint window, centred losses, correlation weights
# ---------------------------------------------------------------------------------------------


def brute_spearman_over_checkpoints(L: np.ndarray, Lz: np.ndarray) -> np.ndarray:
    """rho(i, z): Pearson correlation of the per-example ranks over checkpoints (scipy's ties)."""
    from scipy.stats import rankdata

    ra = rankdata(L, axis=0)
    rb = rankdata(Lz, axis=0)
    rho = np.zeros((L.shape[1], Lz.shape[1]))
    for i in range(L.shape[1]):
        for z in range(Lz.shape[1]):
            a, b = ra[:, i] - ra[:, i].mean(), rb[:, z] - rb[:, z].mean()
            denom = np.sqrt(a.dot(a) * b.dot(b))
            rho[i, z] = a.dot(b) / denom if denom > 0 else 0.0
    return rho


def _problem(T=8, N=13, M=5, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(T, 29)) + 2.0
    L, Lz = rng.uniform(0, 3, size=(T, N)), rng.uniform(0, 3, size=(T, M))
    if ties:  # repeated values inside trajectories, and one constant trajectory
        L = np.round(L)
        Lz = np.round(Lz)
        L[:, 0] = 1.5
    return W, L, Lz


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_centred_and_correlation_weighted_influence_match_materialised(center, weight, ties):
    W, L, Lz = _problem(seed=3, ties=ties)
    k, eta = 2, np.linspace(0.2, 1.0, W.shape[0])
    Lc = L - L.mean(axis=1, keepdims=True) if center else L
    Lzc = Lz - Lz.mean(axis=1, keepdims=True) if center else Lz
    nbrs = brute_neighbors(W, k, "order")
    want = np.einsum("t,tnd,tmd->nm", eta, brute_g(W, Lc, nbrs), brute_g(W, Lzc, nbrs))
    if weight:
        want = want * brute_spearman_over_checkpoints(Lc, Lzc)
    G = gram_matrix(torch.from_numpy(W))
    options = dict(center_losses=center, weight_by_correlation=weight)
    got = train_test_influence(G, torch.from_numpy(L), torch.from_numpy(Lz), k, torch.from_numpy(eta), **options)
    assert rel_err(got, want) < 1e-9
    top = train_test_topk(G, torch.from_numpy(L), torch.from_numpy(Lz), 3, k, torch.from_numpy(eta),
                          block_size=2, tile_rows=4, **options)
    assert np.allclose(top.proponent_scores.numpy(), -np.sort(-want.T, axis=1)[:, :3], rtol=1e-9, atol=1e-12)
    assert np.allclose(top.opponent_scores.numpy(), np.sort(want.T, axis=1)[:, :3], rtol=1e-9, atol=1e-12)
    si = self_influence(G, torch.from_numpy(L), k, torch.from_numpy(eta), center_losses=center)
    g = brute_g(W, Lc, nbrs)
    assert rel_err(si, np.einsum("t,tnd,tnd->n", eta, g, g)) < 1e-9


def test_correlation_weight_is_bounded_and_zero_for_a_constant_trajectory():
    from z0inf_pipeline.influence import trajectory_rank_factors

    _, L, Lz = _problem(ties=True)
    rho = trajectory_rank_factors(torch.from_numpy(L), torch.float64) @ trajectory_rank_factors(
        torch.from_numpy(Lz), torch.float64).T
    assert np.allclose(rho.numpy(), brute_spearman_over_checkpoints(L, Lz), atol=1e-12)
    assert (rho[0] == 0).all()  # column 0 of L is constant


@pytest.mark.parametrize("fraction, kept", [(0.0, [0, 1, 2, 3, 4, 5]), (0.2, [2, 3, 4, 5]), (0.5, [3, 4, 5]),
                                            (0.95, [4, 5])])
def test_warmup_window_keeps_checkpoints_from_the_fraction_on(fraction, kept):
    from z0inf_pipeline.influence import warmup_window

    steps = [0, 5, 20, 50, 80, 100]
    assert warmup_window(steps, fraction).tolist() == kept
    with pytest.raises(InputError, match="warmup_fraction"):
        warmup_window(steps, 1.0)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6])
def test_windowed_analysis_matches_materialised_on_the_kept_checkpoints(checkpoint_dir, fraction):
    """InfluenceAnalysis with a warm-up window = the brute-force estimator on the kept checkpoints only."""
    from z0inf_pipeline.influence import LossTable
    from z0inf_pipeline.influence.analysis import InfluenceAnalysis, InfluenceArguments, TrainTestArguments
    from z0inf_pipeline.influence.signals import SIGNAL_COLUMNS

    folder, states = checkpoint_dir(T=6)
    names = sorted(SHAPES)
    W = torch.stack([flatten(s, names) for s in states]).numpy()
    rng = np.random.default_rng(5)
    L, Lz = rng.uniform(0.01, 3, size=(6, 9)), rng.uniform(0.01, 3, size=(6, 4))
    steps = tuple(range(0, 60, 10))
    train = LossTable(np.arange(9, dtype=np.int64), steps, torch.from_numpy(L))
    test = LossTable(np.arange(100, 104, dtype=np.int64), steps, torch.from_numpy(Lz))
    args = InfluenceArguments(neighbors=2, warmup_fraction=fraction, eta="learning_rate", center_losses=True,
                              weight_by_correlation=True, topk=2)
    # train-test has its own window, k, rule and eta (TrainTestArguments): the same ones here, on the trajectory
    train_test = TrainTestArguments(method="trajectory", warmup_fraction=fraction, neighbors=2,
                                    neighbor_rule=args.neighbor_rule, eta="learning_rate")
    analysis = InfluenceAnalysis(folder, train, test, args, train_test=train_test)
    keep = [t for t, s in enumerate(steps) if s >= fraction * 50]
    eta = np.array([0.1 / (t + 1) for t in keep])
    Lw, Lzw = L[keep], Lz[keep]
    Lc, Lzc = Lw - Lw.mean(axis=1, keepdims=True), Lzw - Lzw.mean(axis=1, keepdims=True)
    nbrs = brute_neighbors(W[keep], 2, args.neighbor_rule)
    g = brute_g(W[keep], Lc, nbrs)
    frame = analysis.self_influence_frame()
    assert list(frame.columns) == ["example_id", *SIGNAL_COLUMNS]
    assert rel_err(frame["self_influence"], np.einsum("t,tnd,tnd->n", eta, g, g)) < 1e-9
    # the loss-table signals use every checkpoint, whatever the window
    assert np.allclose(frame["mean_loss"], L.mean(axis=0))
    assert np.allclose(frame["variance_self_influence"], L.var(axis=0))
    assert np.allclose(frame["confidence"], np.exp(-L).mean(axis=0))
    assert np.allclose(frame["variability"], np.exp(-L).std(axis=0))
    assert np.allclose(frame["final_loss"], L[-1])
    want = np.einsum("t,tnd,tmd->nm", eta, g, brute_g(W[keep], Lzc, nbrs)) * brute_spearman_over_checkpoints(Lc, Lzc)
    top = analysis.topk_frame()
    assert np.allclose(top["proponent_score"].to_numpy().reshape(4, 2), -np.sort(-want.T, axis=1)[:, :2])


def test_confidence_is_nan_for_a_loss_that_is_not_cross_entropy():
    from z0inf_pipeline.influence.signals import loss_signals

    signals = loss_signals(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), "other")
    assert np.isnan(signals["confidence"]).all() and np.isnan(signals["variability"]).all()
    assert signals["mean_loss"].tolist() == [0.5, 1.0]
