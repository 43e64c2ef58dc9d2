"""kNN graph build time and peak memory at scale (issue 3, "Graph at scale").

    OMP_NUM_THREADS=1 python scripts/bench_knn.py                 # both cases, full size
    python scripts/bench_knn.py --case synthetic --n 20000         # quick check that it runs

Cases, each in its own process so that its peak RSS is its own:
  mnist      exact (IndexFlatL2) kNN graph of MNIST's 70000 x 784 pixels, k=3, from the
             prepared shards in --mnist-dir (`sddecc prepare mnist --out data/mnist`).
  synthetic  IVF-Flat kNN graph of --n (1,000,000) synthetic 64-d vectors, k=3, with
             recall@k against exact search on --recall-queries random queries; exits with
             status 1 if recall < --min-recall (0.95).

The synthetic vectors are a Gaussian mixture with structure, not isotropic noise (on which
no index beats brute force): 100 components, each a random 8-dimensional Gaussian subspace
around its own centre, plus small isotropic noise (sd 0.05) in all 64 dimensions, like
image features that lie near low-dimensional manifolds. With the default nlist (4 sqrt(N),
4000 at 1M) and nprobe 16, recall@3 was 1.0 at N=200000 (0.996 with nprobe 8, and 0.992
with nprobe 8 at N=400000); raise --nprobe if the printed recall falls short.

Times are wall-clock seconds on an idle machine (do not time while something else runs);
peak RSS is the process's maximum resident set (getrusage), data included.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import numpy as np


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def gaussian_mixture(n: int, d: int = 64, components: int = 100, latent: int = 8, noise: float = 0.05,
                     seed: int = 0) -> np.ndarray:
    """n float32 vectors, generated in chunks so that no float64 n x d temporary exists."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(components, d)).astype(np.float32)
    bases = rng.normal(scale=1 / np.sqrt(latent), size=(components, latent, d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        which = rng.integers(components, size=m)
        z = rng.normal(size=(m, latent)).astype(np.float32)
        x[start : start + m] = (centres[which] + np.einsum("ml,mld->md", z, bases[which])
                                + noise * rng.normal(size=(m, d)).astype(np.float32))
    return x


def run_case(args: argparse.Namespace) -> int:
    import faiss

    from sddecc_dist.config import IndexParams
    from sddecc_dist.graph import knn_graph, normalized_adjacency

    started = time.perf_counter()
    if args.case == "mnist":
        from sddecc_dist.data import load_all

        images, _ = load_all(args.mnist_dir)
        features = images.flatten(1).numpy()  # shares the tensor's storage: no copy
        if args.n:
            features = np.ascontiguousarray(features[: args.n])
        params = IndexParams(index="flat")
        label = f"MNIST {features.shape[0]} x {features.shape[1]} exact"
    else:
        features = gaussian_mixture(args.n or 1_000_000, seed=args.seed)
        params = IndexParams(index="ivf", nlist=args.nlist, nprobe=args.nprobe,
                             recall_queries=args.recall_queries, seed=args.seed)
        label = f"synthetic Gaussian mixture {features.shape[0]} x {features.shape[1]} IVF-Flat"
    load_seconds = time.perf_counter() - started
    rss_after_load = peak_rss_mib()

    started = time.perf_counter()
    _, neighbors, info = knn_graph(features, args.k, params, use_gpu=args.use_gpu)
    knn_seconds = time.perf_counter() - started
    started = time.perf_counter()
    adjacency = normalized_adjacency(neighbors, neighbors.shape[0])
    adjacency_seconds = time.perf_counter() - started

    print(f"== {label}, k={args.k}, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} thread(s)")
    print(f"index            {info}")
    print(f"data load        {load_seconds:8.1f} s   peak RSS after load {rss_after_load:8.0f} MiB")
    print(f"kNN search       {knn_seconds:8.1f} s   (index build, search and recall measurement)")
    print(f"adjacency        {adjacency_seconds:8.1f} s   {adjacency.values().numel()} nonzeros")
    print(f"graph build      {knn_seconds + adjacency_seconds:8.1f} s   peak RSS {peak_rss_mib():8.0f} MiB")
    recall = info["recall"]
    print(f"recall@{args.k}         {recall if recall is None else f'{recall:.4f}'} ({info['recall_method']})")
    if recall is not None and recall < args.min_recall:
        print(f"recall {recall:.4f} is below --min-recall {args.min_recall}: raise --nprobe")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["all", "mnist", "synthetic"], default="all")
    parser.add_argument("--n", type=int, default=0,
                        help="synthetic: vectors (default 1000000); mnist: use the first N samples (default all)")
    parser.add_argument("--mnist-dir", default="data/mnist")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists; 0: 4 sqrt(N)")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--min-recall", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    if args.case != "all":
        return run_case(args)
    status = 0
    for case in ("mnist", "synthetic"):  # one process each: separate peak RSS
        options = {"--n": args.n, "--mnist-dir": args.mnist_dir, "--k": args.k, "--nlist": args.nlist,
                   "--nprobe": args.nprobe, "--recall-queries": args.recall_queries,
                   "--min-recall": args.min_recall, "--seed": args.seed}
        command = [sys.executable, __file__, "--case", case] + [str(a) for item in options.items() for a in item]
        if args.use_gpu is not None:
            command.append("--use-gpu" if args.use_gpu else "--no-use-gpu")
        status |= subprocess.run(command).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
