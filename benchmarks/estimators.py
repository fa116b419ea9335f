"""Z0-Inf core speed, measured side by side against the references the issue names.

    python benchmarks/estimators.py            # full run (a few minutes on 2 cores)
    python benchmarks/estimators.py --quick    # smaller shapes, a smoke run

Every figure is the median of several repeats on the same inputs in the same process; the
ratios are what to read (absolute times vary with the machine and its load).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from z0inf_pipeline.influence import (
    compute_loss_table,
    gram_matrix,
    load_state_dict,
    open_checkpoints,
    save_checkpoint,
    self_influence,
    train_test_influence,
    train_test_topk,
)
from z0inf_pipeline.influence.estimators import neighbor_indices


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def materialised(W: torch.Tensor, L: torch.Tensor, Lz: torch.Tensor | None, k: int, chunk: int = 64):
    """The reference approach: build g_i(t) as an explicit (batch x D) matrix for every checkpoint."""
    T = W.shape[0]
    nbrs = neighbor_indices(torch.zeros(T, T, dtype=torch.float64), k, "order")
    si = torch.zeros(L.shape[1], dtype=torch.float64, device=W.device)
    inf = None if Lz is None else torch.zeros(L.shape[1], Lz.shape[1], dtype=torch.float64, device=W.device)

    def g(losses, t):
        out = torch.zeros(losses.shape[1], W.shape[1], device=W.device)
        for j in nbrs[t].tolist():
            dw = W[j] - W[t]
            out += torch.outer(losses[j] - losses[t], dw / dw.dot(dw))
        return out / k

    for t in range(T):
        gz = None if Lz is None else g(Lz, t)
        for s in range(0, L.shape[1], chunk):
            gi = g(L[:, s : s + chunk], t)
            si[s : s + chunk] += (gi * gi).sum(dim=1).double()
            if gz is not None:
                inf[s : s + chunk] += (gi @ gz.T).double()
    return si, inf


def section_materialised(args) -> None:
    print("\n## Z0 Gram form vs the materialised (batch x D) computation")
    T, k, N, M = 10, 2, 5000, 50
    print(f"T={T} checkpoints, k={k}, N={N} train, M={M} test; materialised timed on a subset of train")
    print(f"{'D':>9} {'materialised (s, extrapolated to N)':>37} {'Z0 estimator (s)':>17} {'Z0 incl. Gram (s)':>18} "
          f"{'speed-up':>10} {'incl. Gram':>11} {'max rel diff':>13}")
    for D in ([10**5] if args.quick else [10**5, 10**6]):
        gen = torch.Generator().manual_seed(0)
        W = (torch.randn(T, D, generator=gen) * 0.01 + torch.randn(D, generator=gen)).to(DEVICE)
        L, Lz = torch.rand(T, N, generator=gen).to(DEVICE), torch.rand(T, M, generator=gen).to(DEVICE)
        n_sub = 200 if D <= 10**5 or DEVICE.type == "cuda" else 40
        materialised(W, L[:, :8], Lz, k)  # warm-up
        sync()
        start = time.perf_counter()
        ref_si, ref_inf = materialised(W, L[:, :n_sub], Lz, k)
        sync()
        t_mat = (time.perf_counter() - start) * N / n_sub
        G = gram_matrix(W, device=DEVICE)
        t_z0 = median_seconds(lambda: (self_influence(G, L, k), train_test_influence(G, L, Lz, k)))
        t_gram = median_seconds(lambda: gram_matrix(W, device=DEVICE), repeats=3)
        si, inf = self_influence(G, L, k), train_test_influence(G, L, Lz, k)
        diff = max(
            float(((si[:n_sub] - ref_si).abs().max() / ref_si.abs().max())),
            float(((inf[:n_sub] - ref_inf).abs().max() / ref_inf.abs().max())),
        )
        print(f"{D:>9} {t_mat:>37.1f} {t_z0:>17.4f} {t_z0 + t_gram:>18.3f} {t_mat / t_z0:>9.0f}x "
              f"{t_mat / (t_z0 + t_gram):>10.0f}x {diff:>13.1e}")


def section_matmul(args) -> None:
    print("\n## train-test influence vs a bare matmul of the same (N x Tk) @ (Tk x M) shape (float32)")
    T, k = 20, 2
    N, M = (5000, 1000) if args.quick else (20000, 2000)
    if DEVICE.type == "cuda" and not args.quick:  # large enough that kernels, not launches, dominate
        N, M = 200_000, 20_000
    gen = torch.Generator().manual_seed(1)
    G = gram_matrix(torch.randn(T, 100, generator=gen, dtype=torch.float64))
    L, Lz = torch.rand(T, N, generator=gen).to(DEVICE), torch.rand(T, M, generator=gen).to(DEVICE)
    A, B = torch.randn(N, T * k, generator=gen).to(DEVICE), torch.randn(M, T * k, generator=gen).to(DEVICE)
    t_bare = median_seconds(lambda: A @ B.T)  # the same memory layout train_test_influence uses
    t_full = median_seconds(lambda: train_test_influence(G, L, Lz, k))
    t_top = median_seconds(lambda: train_test_topk(G, L, Lz, k=10, neighbors=k), repeats=3)
    print(f"N={N}, M={M}, T={T}, k={k}: bare matmul {t_bare:.4f} s | train_test_influence {t_full:.4f} s "
          f"(ratio {t_full / t_bare:.2f}x, target <= 1.5x) | train_test_topk(k=10) {t_top:.4f} s")


def section_variance(args) -> None:
    print("\n## self-influence vs one plain pass over the same loss table (torch.var), float32")
    T, k = 20, 2
    N = 100_000 if args.quick else 500_000
    if DEVICE.type == "cuda" and not args.quick:
        N = 20_000_000
    gen = torch.Generator().manual_seed(2)
    G = gram_matrix(torch.randn(T, 100, generator=gen, dtype=torch.float64))
    L = torch.rand(T, N, generator=gen).to(DEVICE)
    t_var = median_seconds(lambda: torch.var(L, dim=0))
    t_si = median_seconds(lambda: self_influence(G, L, k))
    print(f"T={T}, N={N}, k={k}: torch.var {t_var:.4f} s | self_influence {t_si:.4f} s "
          f"(ratio {t_si / t_var:.2f}x, target <= 2k = {2 * k}x)")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(kind: str, folder: str, max_elements: int, device: str) -> None:
    """Runs in a fresh process so that its peak RSS is its own."""
    base = peak_rss_bytes()
    paths = sorted(Path(folder).glob("*.safetensors"))
    if device == "cuda":
        torch.zeros(1, device=device)  # start the CUDA context outside the timed region
    start = time.perf_counter()
    if kind == "gram":
        gram_matrix(paths, max_elements=max_elements, device=device)
    else:
        buffer = bytearray(64 << 20)
        for path in paths:
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass
    seconds = time.perf_counter() - start
    print(f"{seconds} {base} {peak_rss_bytes()}")


def evict_page_cache(folder: str) -> None:
    """Drop the files from the page cache, so the next read comes from the disk (a cold read)."""
    for path in Path(folder).iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run_child(kind: str, folder: str, max_elements: int, cold: bool = False) -> tuple[float, int, int]:
    if cold:
        evict_page_cache(folder)
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, folder, str(max_elements), DEVICE.type],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def section_gram_io(args) -> None:
    print("\n## streaming Gram from safetensors files vs plainly reading the same files")
    T = 20
    D = 2_500_000 if args.quick else 10_000_000
    max_elements = 1 << 22 if DEVICE.type == "cuda" else 1 << 16
    with tempfile.TemporaryDirectory() as folder:
        gen = torch.Generator().manual_seed(3)
        base = torch.randn(D, generator=gen)
        for t in range(T):  # a few tensors of different shapes, like a real model
            w = base + 0.01 * t * torch.randn(D, generator=gen)
            state = {"embed.weight": w[: D // 2].reshape(-1, 500), "block.weight": w[D // 2 : -1000].reshape(-1, 100),
                     "head.bias": w[-1000:]}
            save_checkpoint(Path(folder) / f"c{t:03d}.safetensors", state, step=t)
        size = sum(p.stat().st_size for p in Path(folder).iterdir())
        os.sync()  # written pages must be clean before they can be evicted
        mb = 2**20
        print(f"T={T} checkpoints x D={D:,} float32 ({size / mb:.0f} MB on disk), slices of {max_elements:,} values")
        peaks = []
        for cold in (True, False):
            _run_child("read", folder, max_elements)  # warm the page cache (undone before each cold run)
            reads, grams = [], []
            for _ in range(3):
                reads.append(_run_child("read", folder, max_elements, cold))
                grams.append(_run_child("gram", folder, max_elements, cold))
            t_read = statistics.median(r[0] for r in reads)
            t_gram = statistics.median(g[0] for g in grams)
            peaks += grams
            label = "cold (evicted from the page cache)" if cold else "warm (in the page cache)"
            print(f"{label:>35}: plain read {size / mb / t_read:.0f} MB/s | streaming Gram "
                  f"{size / mb / t_gram:.0f} MB/s (throughput ratio {t_read / t_gram:.2f}, target >= 0.5)")
        base_rss = max(g[1] for g in peaks)
        peak_rss = max(g[2] for g in peaks)
        bound = T * max_elements * 4 + 300 * mb
        print(f"Gram process peak RSS {peak_rss / mb:.0f} MB, of which {base_rss / mb:.0f} MB is the interpreter and "
              f"torch before any work (working set {(peak_rss - base_rss) / mb:.0f} MB); bound T x slice + 300 MB = "
              f"{bound / mb:.0f} MB; all weights would be {T * D * 8 / mb:.0f} MB in float64")


def section_loss_tables(args) -> None:
    print("\n## loss tables vs a bare no_grad forward loop over the same data and checkpoints")
    T = 20
    N = 5000 if args.quick else 20000
    gen = torch.Generator().manual_seed(4)
    X, y = torch.randn(N, 64, generator=gen).to(DEVICE), torch.randint(0, 10, (N,), generator=gen).to(DEVICE)

    def factory():
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    loss_fn = nn.CrossEntropyLoss(reduction="none")
    with tempfile.TemporaryDirectory() as folder:
        for t in range(T):
            save_checkpoint(Path(folder) / f"c{t:03d}.safetensors", factory().state_dict(), step=t)
        checkpoints = open_checkpoints(folder)

        def bare():
            model = factory().to(DEVICE)
            rows = []
            for ckpt in checkpoints:
                model.load_state_dict(load_state_dict(ckpt))
                model.eval()
                with torch.no_grad():
                    rows.append(torch.cat([loss_fn(model(X[s : s + 1024]), y[s : s + 1024]) for s in range(0, N, 1024)]))
            return torch.stack(rows)

        def ours():
            return compute_loss_table(factory, checkpoints, (X, y), loss_fn, device=DEVICE, batch_size=1024, progress=False)

        t_bare = median_seconds(bare, repeats=3)
        t_ours = median_seconds(ours, repeats=3)
        print(f"T={T}, N={N}, 3-layer MLP: bare loop {t_bare:.3f} s | compute_loss_table {t_ours:.3f} s "
              f"(ratio {t_ours / t_bare:.2f}x, target <= 1.25x)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    parser.add_argument("--only", nargs="+", choices=["materialised", "matmul", "variance", "gram", "loss"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"# Z0-Inf core benchmark (torch {torch.__version__}, {torch.get_num_threads()} threads, {name}, "
          f"{os.cpu_count()} CPUs)")
    sections = {"materialised": section_materialised, "matmul": section_matmul, "variance": section_variance,
                "gram": section_gram_io, "loss": section_loss_tables}
    for name, fn in sections.items():
        if not args.only or name in args.only:
            fn(args)


if __name__ == "__main__":
    main()
